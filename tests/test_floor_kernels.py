"""benchmarks/floor_kernels.py: its CPU size (--small) runs every variant, each within its stated
tolerance of the piece's reference (compactions and selections exactly), and the compiled-HLO
readers find a cuBLASLt epilogue and count kernels."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmark_scripts import load_benchmark

# A GPU-shaped compiled module: a cuBLASLt GEMM with a fused BIAS_GELU epilogue, its result
# unpacked from the (output, workspace) tuple, one loop fusion after it.
GPU_HLO = """HloModule jit_f, entry_computation_layout={(bf16[8,4]{1,0}, bf16[4,16]{1,0}, bf16[16]{0})->bf16[8,16]{1,0}}

%fused_multiply (param_0: bf16[8,16]) -> bf16[8,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  ROOT %m = bf16[8,16]{1,0} multiply(%param_0, %param_0)
}

ENTRY %main.1 (x: bf16[8,4], w: bf16[4,16], b: bf16[16]) -> bf16[8,16] {
  %x = bf16[8,4]{1,0} parameter(0)
  %w = bf16[4,16]{1,0} parameter(1)
  %b = bf16[16]{0} parameter(2)
  %cublas-lt-matmul.1 = (bf16[8,16]{1,0}, s8[1024]{0}) custom-call(%x, %w, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"beta":0,"epilogue":"BIAS_GELU"}}
  %get-tuple-element.1 = bf16[8,16]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  ROOT %loop_multiply_fusion = bf16[8,16]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_multiply
}
"""


def test_hlo_readers_find_the_epilogue_and_count_kernels():
    bench = load_benchmark("floor_kernels")
    assert bench.gemm_summary(GPU_HLO) == ["cublas.lt.matmul:BIAS_GELU"]
    assert bench.hlo_kernels(GPU_HLO) == collections.Counter({"cublas.lt.matmul": 1, "loop": 1})


@pytest.mark.cpu("the benchmark's small CPU mode; on a GPU run benchmarks/floor_kernels.py itself")
def test_compactions_are_exact_on_empty_full_and_random_rows():
    bench = load_benchmark("floor_kernels")
    rng = np.random.default_rng(0)
    mask = rng.random((1, 2, 6, 37)) < 0.1
    mask[0, 0, 0] = False  # empty row: padded with 0
    mask[0, 0, 1] = True  # full row
    mask[0, 1, 2] = False
    mask[0, 1, 2, -1] = True  # only the last block
    mask = jnp.asarray(mask)
    ctx = bench.SimpleNamespace(bound=int(mask.sum(-1).max()))
    want = [np.asarray(a) for a in bench.compact_current(ctx, mask)]
    assert want[0][0, 0, 0].tolist() == [0] * 37 and want[0][0, 1, 2].tolist() == [36] * 37
    for variant in bench.COMPACT_VARIANTS[1:]:
        got = jax.jit(lambda m, f=variant.fn: f(ctx, m))(mask)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w, err_msg=variant.label)


@pytest.mark.cpu("the benchmark's small CPU mode; on a GPU run benchmarks/floor_kernels.py itself")
def test_small_floor_kernels_variants_match_their_references():
    bench = load_benchmark("floor_kernels")
    out = bench.main(["--small", "--reps", "1"])
    rows = out["rows"]
    assert [r for r in rows if "error" in r] == []
    by_piece = collections.defaultdict(dict)
    for r in rows:
        by_piece[r["piece"]][r["variant"]] = r
    assert set(by_piece) == set(bench.PIECES)
    for piece, variants in by_piece.items():
        assert [v.label for v in bench.VARIANTS[piece]] == list(variants)
        assert variants["a"]["compare_to"] is None  # the reference: the library's formulation
        for r in variants.values():
            assert r["ms"] > 0 and r["kernels"] >= 1
            if r["compare_to"] is None:
                continue
            if r["tol"] is None:  # integer outputs: exact
                assert r["mismatches"] == 0, (piece, r["variant"])
            else:
                assert r["rel_err"] <= r["tol"], (piece, r["variant"], r["rel_err"], r["tol"])
            assert r["ok"]
    # Exactness is asserted where it is meant: compactions and selections compare integers exactly;
    # the float pieces state tolerances (bf16 outputs: <= 2e-2 of the largest reference value).
    for piece in ("compact_5%", "compact_0.2%", "select_5%", "select_0.2%"):
        assert all(v.tol is None for v in bench.VARIANTS[piece])
    for piece in ("ffn_gelu", "ffn_full", "qk_norm_rope", "ln_mod", "resid_ln", "block_means"):
        assert all(v.tol is not None and v.tol <= 2e-2 for v in bench.VARIANTS[piece] if v.compare_to)
    assert by_piece["ffn_gelu"]["a"]["tflops"] > 0 and by_piece["qk_norm_rope"]["a"]["gbps"] > 0
