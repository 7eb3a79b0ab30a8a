"""Train state and the jitted, sharded distillation step (gradient accumulation inside)."""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sparge_jax.dtypes import DTYPES
from train.config import TrainConfig
from train.model import ModelParts, block_paths, fill_from, select, teacher_params, velocity_fn
from train.objective import distillation_loss, example_keys
from train.optimizer import ema_of, trainable_labels
from train.sharding import batch_sharding, replicated


class TrainState(NamedTuple):
    """step: int32 scalar (optimizer steps done); params: pure dict of float32 master weights
    for the trainable leaves and the frozen ones in the compute dtype (`train.model.param_dtypes`);
    opt_state: optax state of the trainable params only (`select(params, labels, "train")`, None
    at the frozen leaves), with `optim.ema_decay` their float32 EMA too (`ema_params`); rng:
    uint32 `(2,)` base key (per-example keys: `train.objective.example_keys`)."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def ema_params(state: TrainState) -> dict | None:
    """The EMA model's whole param tree (`optim.ema_decay`): the float32 EMA at the trainable
    leaves, `state.params`' own leaves at the frozen ones (they never change, so that is their
    average); None when the run keeps no EMA. No array is copied."""
    ema = ema_of(state.opt_state)
    return None if ema is None else fill_from(ema, state.params)


def opt_state_shardings(optimizer: optax.GradientTransformation, params, param_shardings, labels, mesh: Mesh):
    """Optimizer-state shardings (state of the trainable params only): param-shaped leaves
    follow their param, the rest replicated."""
    abstract = jax.eval_shape(optimizer.init, select(params, labels, "train"))
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract, select(param_shardings, labels, "train"),
        transform_non_params=lambda _: replicated(mesh),
    )


def state_shardings(optimizer, params, param_shardings, labels, mesh: Mesh) -> TrainState:
    return TrainState(
        step=replicated(mesh),
        params=param_shardings,
        opt_state=opt_state_shardings(optimizer, params, param_shardings, labels, mesh),
        rng=replicated(mesh),
    )


def init_train_state(optimizer: optax.GradientTransformation, params: dict, labels, seed: int,
                     shardings: TrainState) -> TrainState:
    """Step 0 with `params` (held as `train.model.param_dtypes`), the optimizer state of their
    trainable part and the base key of `seed`, placed with `shardings` (`state_shardings`)."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(select(params, labels, "train"))
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
    return TrainState(jax.device_put(jnp.int32(0), shardings.step), params, opt_state, rng)


def batch_shardings(mesh: Mesh, example_ndims: dict[str, int]) -> dict:
    """Batch arrays are `(grad_accum, micro_batch, ...)`: the micro-batch dim is sharded."""
    return {name: batch_sharding(mesh, ndim + 2, batch_dim=1) for name, ndim in example_ndims.items()}


def make_train_step(parts: ModelParts, optimizer: optax.GradientTransformation, cfg: TrainConfig):
    """step(state, teacher_own, batch) -> (state, metrics). The student (params, attention
    `cfg.objective.student_attention`, sparse by default) is fitted to the frozen teacher (dense
    attention) whose params are `teacher_own` (`train.model.teacher_copy`: its own copy of the
    trainable leaves, None where it shares the student's frozen leaves); grads of `grad_accum`
    micro-batches are averaged before one optimizer update. Gradients are taken with respect to
    the trainable params only (`cfg.optim.trainable`), and only they are updated: the frozen
    ones get no gradient buffers, no weight-gradient matmuls and no optimizer state, and pass
    through the step untouched (in their compute dtype); `metrics["grad_norm"]` is the norm of
    the trainable ones.

    Non-finite guard: when the loss or any gradient is NaN/inf the update is skipped (params
    and optimizer state stay as they were, `step` still advances past the batch) and
    `metrics["skipped"]` is 1.0 (else 0.0)."""
    compute_dtype = DTYPES[cfg.model.compute_dtype]

    def micro_loss(trainable, frozen, teacher_own, batch, keys, differentiated):
        params = fill_from(trainable, frozen)
        student = velocity_fn(parts, params, cfg.objective.student_attention, compute_dtype, differentiated)
        teacher_tree = teacher_params(jax.lax.stop_gradient(params), teacher_own)
        teacher = velocity_fn(parts, teacher_tree, "dense", compute_dtype)
        return distillation_loss(student, teacher, batch, keys, cfg.objective)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, teacher_own, batch):
        # labels by the per-layer paths (`optim.trainable`), laid out as the state (`parts.stacks`)
        labels = parts.stacks.stack_labels(trainable_labels(jax.eval_shape(parts.stacks.unstack, state.params),
                                                            cfg.optim.trainable))
        trainable, frozen = select(state.params, labels, "train"), select(state.params, labels, "freeze")
        differentiated = block_paths(labels)
        accum, micro = batch["latents"].shape[:2]
        # One key per example of the global batch: the same draws for any accum/device split.
        keys = example_keys(state.rng, state.step, accum * micro)
        keys = keys.reshape(accum, micro, *keys.shape[1:])

        def accumulate(grad_sum, inputs):
            micro_batch, micro_keys = inputs
            (_, metrics), grads = grad_fn(trainable, frozen, teacher_own, micro_batch, micro_keys, differentiated)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grad_sum, metrics = jax.lax.scan(accumulate, zeros, (batch, keys))
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.all(jnp.isfinite(jnp.stack(jax.tree.leaves(metrics))))  # loss terms and grad_norm

        def update():
            updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        # A branch, not a select of new and old values: the select read the old optimizer state
        # after its in-place update, so XLA copied all of it (2 x 4 bytes per trainable param).
        trained, opt_state = jax.lax.cond(finite, update, lambda: (trainable, state.opt_state))
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        return TrainState(state.step + 1, fill_from(trained, frozen), opt_state, state.rng), metrics

    return step


class TrainStepCall:
    """`(state, teacher_params, batch) -> (state, metrics)`: the step compiled ahead of its first
    call, which sets `compile_s` (seconds to lower and compile it; None before) and `lower_s`
    (the part of it spent tracing and lowering, the kernels' own lowering included)."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh
        self.compiled, self.compile_s, self.lower_s = None, None, None

    def lower(self, state: TrainState, teacher_params, batch) -> jax.stages.Lowered:
        """The step lowered for `(state, teacher_params, batch)` under the mesh; they may be
        `jax.ShapeDtypeStruct`s (nothing allocated): `.compile().memory_analysis()` gives its buffers."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, teacher_params, batch)

    def __call__(self, state: TrainState, teacher_params, batch):
        if self.compiled is None:
            tick = time.perf_counter()
            lowered = self.lower(state, teacher_params, batch)
            self.lower_s = time.perf_counter() - tick
            self.compiled = lowered.compile()
            self.compile_s = time.perf_counter() - tick
        with jax.set_mesh(self.mesh):
            return self.compiled(state, teacher_params, batch)


def jit_train_step(step_fn, shardings: TrainState, teacher_shardings, batch_shards: dict, mesh: Mesh,
                   compiler_options: dict | None = None) -> TrainStepCall:
    """`jax.jit` with explicit in/out shardings; the incoming state is donated. Traced, compiled
    and run under `jax.set_mesh(mesh)`, so a "context" axis of the mesh turns on context
    parallelism (`sparge_jax.context_parallel`). compiler_options: XLA options of its compile
    (`TrainConfig.compiler_options`)."""
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, teacher_shardings, batch_shards),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=compiler_options or None,
    )
    return TrainStepCall(jitted, mesh)
