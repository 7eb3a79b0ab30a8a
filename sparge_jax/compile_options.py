"""XLA compile options of the Wan model call (`jax.jit(..., compiler_options=...)`).

`TRITON_GEMM_OFF` compiles the GEMMs with cuBLASLt instead of XLA's Triton GEMMs, so XLA
fuses the FFN's bias + GELU into the up-projection's epilogue (BIAS_GELU), which it did not
with Triton GEMMs (`benchmarks/floor_kernels.py`, piece ffn_gelu). Measured 2026-12-02 on one
H200, t2v-1.3B 480p (32760 tokens), random bf16 weights, scanned layers, bf16 residual, per
step in a sampling loop, default compile -> `TRITON_GEMM_OFF`: dense 516.4 -> 506.4 ms, sparse
95 % 192.3 -> 180.1 ms (-6.3 %), floor 176.5 -> 165.1 ms; velocity relative difference to the
default compile 6.7e-3 (bf16 rounding). Command:

    cd benchmarks; PYTHONPATH=..:. python3 wan_step.py --scan-layers --modes dense "sparse 95%" floor \
        "dense -nt" "sparse 95% -nt" "floor -nt" --residual-dtype bfloat16 --profile-calls 1

Measured at 1.3B 480p only (not 14B, 720p, other GPUs or the training step, whose options are
`train.config`'s `compiler_options`).
"""

from __future__ import annotations

import jax

TRITON_GEMM_OFF = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True}


def model_call_options(triton_gemm: bool = False, backend: str | None = None) -> dict | None:
    """The compiler options of the model call: a copy of `TRITON_GEMM_OFF` on a GPU backend
    (default: `jax.default_backend()`) unless `triton_gemm` (XLA's default GEMMs); None
    (XLA's defaults) otherwise."""
    if triton_gemm or (backend or jax.default_backend()) != "gpu":
        return None
    return dict(TRITON_GEMM_OFF)
