"""benchmarks/wan_step.py and benchmarks/train_step.py in their CPU size (--small), the FLOP
count they use against the matmuls of a traced forward, and benchmarks/step_dispatch.py's stand-in step."""

import argparse
import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmark_scripts import load_benchmark as load
from sparge_jax.compile_options import TRITON_GEMM_OFF
from sparge_jax.models import WAN_CONFIGS, WanModel

def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general / conv in a jaxpr, nested ones included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            contract = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contract
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape  # (F, H, W, in, out) for the patch embedding
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[:-1])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _dot_flops(sub)
    return total


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_forward_flops_count_every_matmul(name):
    config = WAN_CONFIGS[name]
    model = WanModel(config, rngs=nnx.Rngs(0))
    latents = jnp.zeros((1, 2, 8, 12, config.out_dim if config.model_type == "i2v" else config.in_dim))
    extra = {}
    if config.model_type == "i2v":
        extra = dict(clip_fea=jnp.zeros((1, 257, config.image_dim)),
                     y=jnp.zeros((1, 2, 8, 12, config.in_dim - config.out_dim)))
    jaxpr = jax.make_jaxpr(lambda x: model(x, jnp.array([500.0]), jnp.zeros((1, 5, config.text_dim)),
                                           attention_mode="dense", **extra)[0])(latents)
    flops = load("step_profile").wan_forward_flops(config, (2, 4, 6), 5)
    assert flops["attention"] + flops["other"] == _dot_flops(jaxpr.jaxpr)


@pytest.mark.cpu("the benchmark's small CPU mode; on a GPU run benchmarks/wan_step.py itself")
def test_small_wan_step():
    out = load("wan_step").main(["--small", "--modes", "sparse 95%", "--reps", "1", "--warmup", "1",
                                 "--profile-calls", "1"])
    assert set(out["steps"]) == set(out["loop"]) == {"sparse 95%", "sparse 95%, scan_layers"}
    assert all(seconds > 0 for seconds in out["loop"].values())
    assert all(0 < out["dispatch"][mode] <= out["steps"][mode] for mode in out["steps"])
    assert all(seconds > 0 for seconds in out["compile"].values())
    for breakdown in out["breakdown"].values():
        assert breakdown["total"] == pytest.approx(sum(v for k, v in breakdown.items() if k != "total"))
        assert min(breakdown["matmul"], breakdown["norm/modulation"], breakdown["rope"]) > 0


@pytest.mark.cpu("the benchmark's small CPU mode; on a GPU run benchmarks/wan_step.py itself")
def test_small_wan_step_scanned_with_and_without_triton_gemms(monkeypatch, capsys):
    """--scan-layers scans every mode; a " -nt" mode compiles with TRITON_GEMM_OFF (GPU options,
    which XLA's CPU backend ignores: the same velocity), and really passes them: an unknown
    option in their place fails that mode alone, and one given with --xla fails every mode.
    --residual-dtype reaches the header line."""
    wan_step = load("wan_step")
    argv = ["--small", "--scan-layers", "--modes", "floor", "floor -nt", "--reps", "1", "--warmup", "1",
            "--profile-calls", "0", "--residual-dtype", "bfloat16"]
    out = wan_step.main(argv)
    assert "tokens, float32, residual bfloat16\n" in capsys.readouterr().out
    assert set(out["steps"]) == set(out["loop"]) == {"floor, scan_layers", "floor -nt, scan_layers"}
    assert out["gemms"]["floor, scan_layers"] == out["gemms"]["floor -nt, scan_layers"]
    assert sum(out["gemms"]["floor, scan_layers"].values()) > 0
    monkeypatch.setattr(wan_step, "TRITON_GEMM_OFF", {"no_such_option": True})
    assert set(wan_step.main(argv)["steps"]) == {"floor, scan_layers"}
    monkeypatch.undo()
    # --xla options reach every mode's compile: an unknown one fails them all
    assert wan_step.main([*argv, "--xla", "no_such_option=1"])["steps"] == {}
    assert [wan_step.xla_option(t) for t in ("a=false", "b=3", "c=0.5", "d=FUSION,CUBLAS")] == [
        ("a", False), ("b", 3), ("c", 0.5), ("d", "FUSION,CUBLAS")]
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        wan_step.xla_option("xla_allow_excess_precision")


@pytest.mark.cpu("the benchmark's small CPU mode; on a GPU run benchmarks/wan_step.py itself")
def test_small_wan_step_compile_only():
    out = load("wan_step").main(["--small", "--compile-only", "--modes", "floor", "dense"])
    assert set(out) == {"compile"} and set(out["compile"]) == {"floor", "floor, scan_layers", "dense",
                                                               "dense, scan_layers"}
    assert all(seconds > 0 for seconds in out["compile"].values())


@pytest.mark.cpu("the benchmark's small CPU mode; on a GPU run benchmarks/train_step.py itself")
def test_small_train_step():
    out = load("train_step").main(["--small", "--steps", "2", "--scan", "--no-triton-gemm", "--peak-tflops", "1",
                                   "optim.trainable=self_attn", "model.residual_dtype=bfloat16"])
    assert out["compiler_options"] == TRITON_GEMM_OFF  # GPU options: ignored on CPU
    config = WAN_CONFIGS["tiny"]
    attention_params = config.num_layers * (4 * (config.dim * config.dim + config.dim) + 2 * config.dim)
    assert out["teacher_bytes"] == attention_params * 4  # float32 compute: its own copy of self-attention only
    assert out["shared_bytes"] > 2 * out["teacher_bytes"]
    assert out["flops"]["backward"] == 2 * out["flops"]["student forward"] == 2 * out["flops"]["recompute"]
    assert out["flops"]["teacher forward"] > out["flops"]["student forward"]
    assert out["mfu"] == pytest.approx(sum(out["flops"].values()) / out["step_s"] / 1e12)


def test_memory_model_holds_frozen_params_in_the_compute_dtype_without_grads_or_moments():
    """benchmarks/memory_model.py with `optim.trainable=self_attn`: float32 master weights, the
    teacher's own copy, gradients, their compute-dtype stack and AdamW moments for the
    self-attention params only, every other param once in bf16; all params trainable: each term
    over every param. An EMA (`optim.ema_decay`) adds a float32 copy of the trainable params,
    `optim.mu_dtype=bfloat16` takes 2 bytes per trainable param off the moments and
    `model.remat_input_dtype=bfloat16` halves the saved block inputs, `model.residual_dtype=bfloat16`
    those and the residual-stream copies of the block's working set."""
    memory_model = load("memory_model")
    config = WAN_CONFIGS["tiny"]
    attention = config.num_layers * (4 * (config.dim * config.dim + config.dim) + 2 * config.dim)
    total = memory_model.param_counts("tiny")[0]
    blocks = config.num_layers * memory_model.param_counts("tiny")[1]
    mesh = memory_model.Mesh(fsdp=2)
    for trainable, trained, in_blocks in ((None, total, blocks), ("self_attn", attention, attention)):
        terms = memory_model.memory("tiny", 100, mesh, trainable=trainable)
        want = {"params": 4 * trained + 2 * (total - trained), "teacher": 2 * trained, "optimizer": 8 * trained,
                "ema": 0, "stacked": 4 * in_blocks, "grads": 4 * trained + 2 * in_blocks}
        assert {name: terms[name] * 2 for name in want} == want
        with_ema = memory_model.memory("tiny", 100, mesh, trainable=trainable, ema=True)
        assert with_ema == {**terms, "ema": 4 * trained / 2}
        small = memory_model.memory("tiny", 100, mesh, trainable=trainable, mu_dtype="bfloat16",
                                    remat_input_dtype="bfloat16")
        assert small == {**terms, "optimizer": 6 * trained / 2, "saved": terms["saved"] / 2}
        # a bf16 residual stream: block inputs saved in bf16 whatever remat_input_dtype, and its
        # ~8 float32 copies per token (and their gradients) of the block's working set halved
        narrow = memory_model.memory("tiny", 100, mesh, trainable=trainable, residual_dtype="bfloat16")
        assert narrow == {**terms, "saved": terms["saved"] / 2, "block": terms["block"] - 100 * 2 * 8 * config.dim * 2}
        backward = sum(terms[k] for k in ("stacked", "gathered", "saved", "block"))
        state = sum(terms[k] for k in ("params", "teacher", "optimizer", "ema"))
        assert memory_model.peak(terms) == state + max(backward, terms["grads"])


@pytest.mark.parametrize("overrides", [[], ["optim.mu_dtype=bfloat16"]], ids=["float32 mu", "bfloat16 mu"])
def test_memory_model_state_terms_are_the_train_state_bytes(overrides):
    """The model's params, optimizer and teacher terms are the bytes of the train state and the
    teacher's own params as `train.loop` holds them (benchmarks/step_memory.py's abstract
    inputs), less the step counter, Adam's count and the key."""
    memory_model, step_memory = load("memory_model"), load("step_memory")
    cfg = step_memory.step_config("tiny", (2, 4, 4), ["optim.trainable=self_attn", *overrides])
    _, _, _, (state, teacher, _) = step_memory.abstract_inputs(cfg)
    terms = memory_model.memory("tiny", 8, memory_model.Mesh(), trainable="self_attn", mu_dtype=cfg.optim.mu_dtype)
    scalars = sum(x.dtype.itemsize * x.size for x in jax.tree.leaves(state) if x.size <= 2)
    assert terms["params"] + terms["optimizer"] == step_memory.nbytes(state) - scalars
    assert terms["teacher"] == step_memory.nbytes(teacher)


def test_trace_events_map_to_the_module_ops_by_stat_or_kernel_name():
    """A trace event names its op through an `hlo_op` stat (CPU thunks), as an "XLA Ops" event,
    or (GPU kernels, which carry `hlo_module`) through its kernel name, where XLA writes the
    instruction name's '.' and '-' as '_'; other events (runtime, other programs) count nowhere."""
    profile = load("step_profile")
    by_name = {profile._kernel_name(name): category
               for name, category in {"loop_add_fusion.3": "other", "cublas-gemm.1": "matmul"}.items()}
    category = lambda name, stats, named: profile.event_lookup(name, stats, by_name, named_after_op=named)
    assert category("ThreadpoolListener", {"hlo_op": "loop_add_fusion.3"}, False) == "other"
    assert category("cublas-gemm.1", {}, True) == "matmul"
    assert category("loop_add_fusion_3", {"hlo_module": "jit_step", "program_id": 7}, False) == "other"
    assert category("cublas_gemm_1", {"hlo_module": "jit_step"}, False) == "matmul"
    assert category("loop_add_fusion_3", {}, False) is None  # no op named, not a kernel event
    assert category("memcpy", {"hlo_module": "jit_step"}, False) is None


def test_step_dispatch_stand_in_updates_only_after_finite_steps():
    """benchmarks/step_dispatch.py: every way of writing the guarded update gives NumPy's state
    (decayed, plus the chain's first entry) after a finite chain and the old state after one
    that met a NaN; its table has a row per variant with the dispatch inside the call's time."""
    import numpy as np

    dispatch = load("step_dispatch")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 8)).astype(np.float32), (rng.standard_normal((8, 8)) / 3).astype(np.float32)
    h = x.astype(np.float64)
    for _ in range(3):
        h = np.tanh(h @ w)
    state = np.arange(5, dtype=np.float32)
    for chain in (dispatch.unrolled_chain, dispatch.scanned_chain):
        for skip in ("cond", "select"):
            step = jax.jit(dispatch.guarded_step(chain, skip, 3))
            new, total = step(jnp.asarray(state), jnp.asarray(x), jnp.asarray(w))
            np.testing.assert_allclose(np.asarray(new), state * 0.999 + h[0, 0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(total), h.sum(), rtol=1e-4, atol=1e-4)
            bad = x.copy()
            bad[3, 3] = np.nan
            kept, _ = step(jnp.asarray(state), jnp.asarray(bad), jnp.asarray(w))
            np.testing.assert_array_equal(np.asarray(kept), state)
    rows = dispatch.main(["--size", "32", "--layers", "2", "--state-mib", "1", "--calls", "2"])
    assert len(rows) == 6 and all(0 < d <= f for _, d, f in rows)
