"""The student's achieved block sparsity on the training batch, measured at logged steps, and the
one-line warning when a configuration skips nothing.

One jitted dense forward of the first micro-batch of the step's batch, in the training compute
dtype (the dtype the student's own step predicts its masks in), at the noise levels and noise
the step draws for those examples (the per-example keys of `train.step.make_train_step`); each
self-attention call builds the student's masks from its q, k, v inside the forward and keeps
only the fraction skipped (`train.generate.layer_sparsity`), so no layer's q, k, v outlive it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pallas_kernels.blocks import num_blocks
from train.block_stacks import BlockStacks
from train.generate import layer_sparsity
from train.metrics import tokens_per_example
from train.model import ModelParts
from train.objective import example_keys, sample_noise


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "stacks", "shift", "pure_noise_share", "dtype"))
def _probe(params, rest, rng, step, batch, *, graphdef, config, shift, dtype, pure_noise_share=0.0,
           stacks=BlockStacks()):
    """`layer_sparsity` `(num_layers,)` in `dtype` on micro-batch 0 of `batch` `(grad_accum, micro,
    ...)` at the sigma and noise that step `step` draws for its examples. Jitted at module level,
    keyed on the model structure: later runs of the same model and shapes (tests, sweeps) reuse
    the compiled probe."""
    micro = {name: value[0] for name, value in batch.items()}
    count = batch["latents"].shape[0] * batch["latents"].shape[1]
    keys = example_keys(rng, step, count)[: micro["latents"].shape[0]]  # micro-batch 0 holds the first
    sigma, noise = sample_noise(keys, micro["latents"], shift, pure_noise_share)
    return layer_sparsity(ModelParts(graphdef, rest, config, stacks), params, micro, sigma, noise, dtype=dtype)


class BatchSparsity:
    """`(params, rng, step, batch) -> float`: the fraction of (q block, k block) pairs the student
    skips on the first micro-batch of a training batch `(grad_accum, micro, ...)`, with the params
    the step starts from, mean over layers, examples and heads; layers in `dense_layers` count as
    0 and a dense student (`student_mode="dense"`) logs 0 without measuring.

    `warning(value)` gives, once per run, the line to print when the student skips nothing: at
    start (`value=None`) for the reasons known from the configuration (dense student, every layer
    dense), else when the first measurement comes out 0 (the sequence fits in one block, or the
    method keeps every block at this size)."""

    def __init__(self, parts: ModelParts, latent_shape, *, student_mode: str, shift: float, compute_dtype,
                 pure_noise_share: float = 0.0):
        self.parts, self.latent_shape = parts, tuple(latent_shape)
        self.shift, self.pure_noise_share = shift, pure_noise_share
        self.compute_dtype = jnp.dtype(compute_dtype)
        config = parts.config
        self.skips_nothing = None
        if student_mode == "dense":
            self.skips_nothing = "objective.student_attention is 'dense'"
        elif set(range(config.num_layers)) <= set(config.dense_layers):
            self.skips_nothing = f"every layer is in dense_layers {tuple(config.dense_layers)}"
        self.warned = False

    def __call__(self, params, rng, step: int, batch: dict) -> float:
        if self.skips_nothing is not None:
            return 0.0
        config = self.parts.config
        per_layer = _probe(params, self.parts.rest, rng, step, batch, graphdef=self.parts.graphdef, config=config,
                           stacks=self.parts.stacks,
                           shift=self.shift, pure_noise_share=self.pure_noise_share, dtype=self.compute_dtype)
        per_layer = multihost_utils.process_allgather(per_layer, tiled=True)  # its value, on every process
        return float(np.mean(np.asarray(per_layer, np.float64)))

    def warning(self, value: float | None) -> str | None:
        """The skips-nothing line, or None; decided at start (`value=None`) when the configuration
        says so, else by the first measurement: later ones never warn."""
        if self.warned or (value is None and self.skips_nothing is None):
            return None
        self.warned = True
        if value is not None and value > 0:
            return None
        return f"warning: the student skips no attention block (block_sparsity 0): {self._reason()}"

    def _reason(self) -> str:
        if self.skips_nothing is not None:
            return self.skips_nothing
        config = self.parts.config
        kernel = config.sparse.kernel
        tokens = tokens_per_example(self.latent_shape, config.patch_size)
        nq, nk = num_blocks(tokens, kernel.block_q), num_blocks(tokens, kernel.block_k)
        if nq == nk == 1:
            return (f"the sequence of {tokens} tokens fits in one block (block_q {kernel.block_q}, "
                    f"block_k {kernel.block_k}); use longer clips or smaller blocks")
        method = getattr(config.sparse.method, "kind", type(config.sparse.method).__name__)
        return (f"method {method!r} keeps every block at this size ({tokens} tokens, {nq} x {nk} blocks "
                f"of {kernel.block_q} x {kernel.block_k})")
