"""The training run: build mesh, model, teacher, optimizer, data; resume; step; log; save."""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from tqdm import tqdm

from train.checkpointing import Checkpointer
from train.config import TrainConfig
from train.data import BatchLoader, ShardedLatents, SyntheticLatents
from train.heldout import HeldoutEvaluation
from train.metrics import JsonlWriter, TensorBoardWriter, host_scalars, param_checksum, tokens_per_example
from train.model import DTYPES, abstract_model, cast_floats, init_params
from train.optimizer import learning_rate_schedule, make_optimizer
from train.procedural import ProceduralClips, clip_spec
from train.sharding import batch_divisor, batch_sharding, make_mesh, param_shardings
from train.step import TrainState, batch_shardings, jit_train_step, make_train_step, state_shardings


class TrainResult(NamedTuple):
    """Final state, the frozen teacher params, metrics of the last step, the parameter
    checksum (same on all hosts), and the held-out evaluations (`cfg.eval_every`; each with
    its "step", step 0 before training)."""

    state: TrainState
    teacher: dict
    metrics: dict[str, float]
    checksum: float
    mesh: jax.sharding.Mesh
    evaluations: list[dict]


def data_source(cfg: TrainConfig, model_config):
    """The configured example source: on-disk shards, or synthetic latents shaped for the model."""
    if cfg.data.path is not None:
        source = ShardedLatents(cfg.data.path)
        channels = source.shapes["latents"][-1]
        if channels != model_config.in_dim or source.shapes["context"][-1] != model_config.text_dim:
            raise ValueError(
                f"data at {cfg.data.path!r} has latents {source.shapes['latents']} and context {source.shapes['context']}; "
                f"the model expects {model_config.in_dim} latent channels and text_dim {model_config.text_dim}"
            )
        return source
    if model_config.model_type != "t2v":
        raise ValueError("synthetic data covers t2v models only (i2v needs clip_fea and y)")
    if cfg.data.source == "procedural":
        spec = clip_spec(cfg.data.procedural, model_config.text_dim, model_config.in_dim)
        return ProceduralClips(spec, cfg.data.procedural.examples, cfg.data.seed)
    latent_shape = (*cfg.data.synthetic_latent_shape, model_config.in_dim)
    return SyntheticLatents(
        cfg.data.synthetic_examples, latent_shape, cfg.data.synthetic_text_len, model_config.text_dim, cfg.data.seed
    )


def check_batch(cfg: TrainConfig, mesh) -> None:
    micro = cfg.data.batch_size // cfg.data.grad_accum
    if micro % batch_divisor(mesh):
        raise ValueError(
            f"micro-batch size {micro} (data.batch_size / data.grad_accum) must be a multiple of the "
            f"data*fsdp mesh size {batch_divisor(mesh)}"
        )


def _meta(cfg: TrainConfig, step: int, loader: BatchLoader) -> dict:
    return {
        "step": step,
        "data_position": loader.position(step),
        "data_seed": cfg.data.seed,
        "global_batch": cfg.data.batch_size,
        "config": cfg.to_dict(),
    }


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or continue, with `resume`) the distillation described by `cfg`.

    Turns on `jax_threefry_gpu_kernel_lowering` (same random bits, one kernel per draw):
    unrolled threefry made the random init of a 1.3B model compile for minutes on GPU.
    """
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    _, abstract_params = abstract_model(cfg.model)
    shardings = param_shardings(abstract_params, mesh)
    parts, params = init_params(cfg.model, cfg.seed, shardings)
    compute_dtype = DTYPES[cfg.model.compute_dtype]
    # The frozen teacher: the initial weights in the compute dtype (a separate buffer).
    teacher = jax.jit(lambda p: cast_floats(p, compute_dtype), out_shardings=shardings)(params)
    optimizer = make_optimizer(cfg.optim, cfg.steps, params)
    state_sh = state_shardings(optimizer, params, shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), state_sh.rng)
    state = TrainState(jax.device_put(jnp.int32(0), state_sh.step), params, opt_state, rng)

    source = data_source(cfg, parts.config)
    batch_sh = batch_shardings(mesh, {name: len(shape) for name, shape in source.shapes.items()})
    loader = BatchLoader(
        source, cfg.data.batch_size, cfg.data.grad_accum, cfg.data.seed, lambda ndim: batch_sharding(mesh, ndim, 1)
    )

    checkpointer = None
    start = 0
    if cfg.checkpoint.dir is not None:
        checkpointer = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
        latest = checkpointer.latest_step()
        if latest is not None and not resume:
            raise ValueError(f"checkpoint.dir {cfg.checkpoint.dir!r} already holds step {latest}; pass --resume or use a new dir")
        if latest is not None:
            state, meta = checkpointer.restore(latest, state)
            if meta["data_seed"] != cfg.data.seed or meta["global_batch"] != cfg.data.batch_size:
                raise ValueError("data.seed / data.batch_size differ from the checkpoint's; resuming would change the data order")
            start = int(meta["step"])
            if meta["data_position"] != loader.position(start):
                raise ValueError(f"checkpoint data position {meta['data_position']} does not match step {start}")

    step_fn = jit_train_step(make_train_step(parts, optimizer, cfg), state_sh, shardings, batch_sh, mesh)
    metrics_path = cfg.metrics_path or (f"{cfg.checkpoint.dir}/metrics.jsonl" if cfg.checkpoint.dir else None)
    writers = (JsonlWriter(metrics_path), TensorBoardWriter(cfg.tensorboard_dir))
    heldout = None
    if cfg.eval_every:
        heldout = HeldoutEvaluation(parts, source.spec, cfg.eval_examples, student_mode=cfg.objective.student_attention,
                                    compute_dtype=compute_dtype, shift=cfg.objective.shift, seed=cfg.data.seed)
    evaluations = [{"step": start, **heldout(state.params, teacher)}] if heldout is not None else []
    for writer in writers:
        for record in evaluations:
            writer.write(record)
    tokens = cfg.data.batch_size * tokens_per_example(source.shapes["latents"], parts.config.patch_size)
    schedule_lr = learning_rate_schedule(cfg.optim, cfg.steps)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or jax.process_index() != 0)
    metrics: dict[str, float] = {}
    for step in bar:
        tick = time.perf_counter()
        state, step_metrics = step_fn(state, teacher, loader.batch(step))
        metrics = host_scalars(step_metrics)
        elapsed = time.perf_counter() - tick
        metrics.update(step=step + 1, lr=float(schedule_lr(step)), step_time=elapsed, tokens_per_s=tokens / elapsed)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", step_s=f"{elapsed:.2f}", tok_s=f"{tokens / elapsed:.3g}")
        if heldout is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            evaluations.append({"step": step + 1, **heldout(state.params, teacher)})
            metrics.update(evaluations[-1])
            if progress and jax.process_index() == 0:
                bar.write(" ".join(f"{k} {v:.4g}" for k, v in evaluations[-1].items()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            for writer in writers:
                writer.write(metrics)
        if checkpointer is not None and ((step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.steps):
            checkpointer.save(step + 1, state, _meta(cfg, step + 1, loader))
    if checkpointer is not None:
        checkpointer.wait()
        checkpointer.close()
    writers[1].close()
    return TrainResult(state, teacher, metrics, param_checksum(state.params, mesh), mesh, evaluations)


