"""Fingerprints of the lowered kernel modules: one sha256 per kernel case, locations stripped.

A refactor of `pallas_kernels` that must not change the kernels is checked by running
this before and after it: every hash must be equal (diff the `--dump` folders where not).
Each case is lowered with `jax.jit(...).trace(...).lower(lowering_platforms=...)`, which
needs no accelerator: the Pallas TPU cases lower for "tpu", the Mosaic GPU and Triton
(fused block selection) cases for "cuda" (Triton under an abstract H100 mesh, as it asks
for the GPU's compute capability), so all run on CPU; on a GPU machine they lower the same.

The kernels travel inside the StableHLO module as serialized MLIR (a base64 body for
TPU, bytecode attributes for Mosaic GPU and Triton) that carries source locations
(file paths and lines). Those payloads are decoded and printed without debug info, the
Mosaic GPU `kernel_hash` (a hash of the payload with its locations) is dropped, as is the
per-process counter in Mosaic GPU's `dump_basename` (so a case hashes the same whichever
cases ran before it), and the outer module is printed without locations, with each
payload replaced by its sha256.

Usage (from the repository root, so this checkout's packages are imported):
  PYTHONPATH=. python benchmarks/lowering_fingerprint.py [--cases gpu|tpu|all] [--dump DIR]
Prints `case sha256` lines; with --dump, writes DIR/<case>.mlir (the outer module) and
DIR/<case>.<n>.mlir (its n-th kernel payload).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as triton_dialect
from jax._src.mesh import AbstractDevice
from jax.experimental.mosaic.dialects import tpu as tpu_dialect
from jax.experimental.mosaic.gpu import dialect as mosaic_gpu_dialect

from pallas_kernels import mosaic_gpu, tpu
from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import num_blocks
from pallas_kernels.triton import block_select

_ABSTRACT_GPU = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
_DUMP_NUMBER = re.compile(r'(mosaic_gpu\.dump_basename = "\w+?)_\d+"')
_NUM_CTAS = 132  # the Mosaic GPU forward's persistent CTAs (an H100's SM count), fixed so CPU and GPU agree


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _attention_args(batch, seq_q, seq_k, heads, head_dim, dtype, block_q, block_k, backward):
    """Abstract (q, k, v, index) or (q, k, v, out, lse, dout, index) for one attention case."""
    q, kv = _spec((batch, seq_q, heads, head_dim), dtype), _spec((batch, seq_k, heads, head_dim), dtype)
    mask = jnp.ones((batch, heads, num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)), bool)
    index = jax.tree.map(lambda a: _spec(a.shape, a.dtype), mask_to_block_index(mask))
    if not backward:
        return (q, kv, kv, index)
    return (q, kv, kv, q, _spec((batch, heads, seq_q), jnp.float32), q, index)


def _attention_case(kernel, platform, shape, block_q, block_k, backward, **kwargs):
    """(function, abstract args, lowering platform, abstract mesh or None) of one attention kernel call."""
    sm_scale = shape[4] ** -0.5
    args = _attention_args(*shape, block_q, block_k, backward)

    def call(*a):
        return kernel(*a, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=False, **kwargs)

    return call, args, platform, None


def _selection_case(seq_q, seq_k, heads, head_dim, block_q, block_k):
    """The three fused block-selection kernels (Triton) chained as the masks layer chains them."""
    q, k = _spec((1, seq_q, heads, head_dim), jnp.bfloat16), _spec((1, seq_k, heads, head_dim), jnp.bfloat16)

    def call(q, k):
        sums = block_select.block_sums(q, k, block_q=block_q, block_k=block_k)
        kv_indices, kv_counts, mask = block_select.select_rows(
            *sums, n_min=(2,) * heads, topp=(0.5,) * heads, seq_q=seq_q, seq_k=seq_k, block_q=block_q,
            block_k=block_k, sm_scale=head_dim ** -0.5, keep_first=True, keep_diagonal=True,
        )
        return kv_indices, kv_counts, block_select.transpose_lists(mask)

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_ABSTRACT_GPU)
    return call, (q, k), "cuda", mesh


def cases() -> dict[str, tuple[str, tuple]]:
    """case name -> (group, case). Shapes: (batch, seq_q, seq_k, heads, head_dim, dtype);
    seq 300 is ragged (not a multiple of 8: the Mosaic GPU kernels' side buffers)."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    ragged, even = (1, 300, 300, 2, 128, bf16), (1, 256, 192, 2, 64, bf16)
    long = (1, 65600, 65600, 2, 128, bf16)  # a head's dQ slice past FUSED_DQ_SLICE_BYTES: the auto cond
    mgpu_fwd, mgpu_bwd = mosaic_gpu.forward, mosaic_gpu.backward
    return {
        "tpu_fwd_bf16_ragged": ("tpu", _attention_case(tpu.forward, "tpu", ragged, 128, 64, False)),
        "tpu_bwd_bf16_ragged": ("tpu", _attention_case(tpu.backward, "tpu", ragged, 128, 64, True)),
        "tpu_fwd_f32_1head": ("tpu", _attention_case(tpu.forward, "tpu", (2, 200, 150, 1, 64, f32), 128, 8, False)),
        "tpu_bwd_f32_1head": ("tpu", _attention_case(tpu.backward, "tpu", (2, 200, 150, 1, 64, f32), 128, 8, True)),
        "mgpu_fwd_ragged": ("gpu", _attention_case(mgpu_fwd, "cuda", ragged, 128, 64, False, num_ctas=_NUM_CTAS)),
        "mgpu_fwd_even_64keys": ("gpu", _attention_case(
            mgpu_fwd, "cuda", even, 64, 64, False, num_ctas=_NUM_CTAS, keys_per_step=64)),
        "mgpu_bwd_ragged": ("gpu", _attention_case(mgpu_bwd, "cuda", ragged, 128, 64, True, fused=False)),
        "mgpu_bwd_even": ("gpu", _attention_case(mgpu_bwd, "cuda", even, 64, 64, True, fused=False)),
        "mgpu_bwd_fused_ragged": ("gpu", _attention_case(mgpu_bwd, "cuda", ragged, 128, 64, True, fused=True)),
        "mgpu_bwd_auto_long": ("gpu", _attention_case(mgpu_bwd, "cuda", long, 128, 64, True, fused=None)),
        "triton_select_blocks": ("gpu", _selection_case(300, 700, 2, 64, 128, 64)),
    }


def _payload_text(blob: bytes, dialect: str) -> str:
    """A serialized MLIR payload printed without locations. dialect: "tpu", "mosaic_gpu" or "triton"
    (each parsed in a fresh context with its dialect registered: their attributes clash)."""
    context = mlir._create_ir_context()  # noqa: SLF001 (the public one is shared and reused)
    modules = {"tpu": tpu_dialect, "mosaic_gpu": mosaic_gpu_dialect, "triton": triton_dialect}
    modules[dialect].register_dialect(context)
    context.allow_unregistered_dialects = True
    with context:
        text = ir.Module.parse(blob).operation.get_asm(enable_debug_info=False)
    # Mosaic GPU numbers its kernels' dump names in the order the process lowers them.
    return _DUMP_NUMBER.sub(r"\1", text)


def _custom_calls(op) -> list:
    found = []
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                if child.operation.name == "stablehlo.custom_call":
                    found.append(child.operation)
                found += _custom_calls(child.operation)
    return found


def canonical_texts(lowered) -> list[str]:
    """[outer module text, payload texts...], all without locations."""
    module = lowered.compiler_ir("stablehlo")
    payloads = []

    def digest(blob: bytes, dialect: str) -> str:
        payloads.append(_payload_text(blob, dialect))
        return "sha256:" + hashlib.sha256(payloads[-1].encode()).hexdigest()

    with module.context:
        for op in _custom_calls(module.operation):
            attrs = op.attributes
            if "mhlo.backend_config" in attrs:  # Mosaic GPU ("module") and Triton ("ir")
                config = ir.DictAttr(attrs["mhlo.backend_config"])
                fields = {config[i].name: config[i].attr for i in range(len(config))}
                fields.pop("kernel_hash", None)
                for key, dialect in (("module", "mosaic_gpu"), ("ir", "triton")):
                    if key in fields:
                        fields[key] = ir.StringAttr.get(digest(ir.StringAttr(fields[key]).value_bytes, dialect))
                attrs["mhlo.backend_config"] = ir.DictAttr.get(fields)
            elif ir.StringAttr(attrs["call_target_name"]).value == "tpu_custom_call":
                config = json.loads(ir.StringAttr(attrs["backend_config"]).value)
                body = config["custom_call_config"]["body"]
                config["custom_call_config"]["body"] = digest(base64.b64decode(body), "tpu")
                attrs["backend_config"] = ir.StringAttr.get(json.dumps(config, sort_keys=True))
        outer = module.operation.get_asm(enable_debug_info=False)
    return [outer, *payloads]


def lower(case) -> object:
    fn, args, platform, mesh = case
    with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", choices=("gpu", "tpu", "all"), default="all")
    parser.add_argument("--dump", type=pathlib.Path, help="folder for the location-free module texts")
    args = parser.parse_args()
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    for name, (group, case) in cases().items():
        if args.cases not in (group, "all"):
            continue
        texts = canonical_texts(lower(case))
        total = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        print(f"{name} {total}", flush=True)
        if args.dump:
            for i, text in enumerate(texts):
                (args.dump / (f"{name}.mlir" if i == 0 else f"{name}.{i}.mlir")).write_text(text)


if __name__ == "__main__":
    main()
