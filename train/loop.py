"""The training run: build mesh, model, teacher, optimizer, data; resume; step; log; save."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sparge_jax.dtypes import DTYPES
from train.batch_sparsity import BatchSparsity
from train.block_stacks import BlockStacks
from train.checkpointing import Checkpointer
from train.config import TrainConfig
from train.data import BatchLoader, ShardedLatents, SyntheticLatents, nonfinite_examples
from train.guard import SkipTracker
from train.heldout import HeldoutEvaluation
from train.metrics import JsonlWriter, TensorBoardWriter, host_scalars, param_checksum, tokens_per_example
from train.model import ModelParts, abstract_model, init_params, teacher_copy, teacher_params
from train.optimizer import learning_rate_schedule, make_optimizer, path_string, trainable_labels
from train.prefetch import BatchPrefetcher
from train.procedural import ProceduralClips, clip_spec
from train.sharding import batch_divisor, batch_sharding, make_mesh, param_shardings
from train.shutdown import StopRequested, StopRequests
from train.step import (TrainState, batch_shardings, ema_params, init_train_state, jit_train_step, make_train_step,
                        state_shardings)


class TrainResult(NamedTuple):
    """Final state, the frozen teacher params (its own trainable leaves, the student's frozen
    ones: `train.model.teacher_params`), metrics of the last step, the parameter
    checksum (same on all hosts), the held-out evaluations (`cfg.eval_every`; each with
    its "step", step 0 before training), and with `optim.ema_decay` the EMA model's whole
    param tree (`train.step.ema_params`; None without EMA). The param trees are laid out as
    `stacks` (`train.block_stacks.BlockStacks`: scanned blocks' params stacked); `per_layer`
    gives one in the layout of `abstract_model` that sampling, export and evaluation read."""

    state: TrainState
    teacher: dict
    metrics: dict[str, float]
    checksum: float
    mesh: jax.sharding.Mesh
    evaluations: list[dict]
    ema_params: dict | None = None
    stacks: BlockStacks = BlockStacks()

    def handed_out(self) -> dict:
        """The weights the run hands out (export, the end-of-run report): the EMA of the trained params
        when the run keeps one (`optim.ema_decay`), else the trained params; stacked as `state.params`."""
        return self.state.params if self.ema_params is None else self.ema_params

    def per_layer(self, tree: dict) -> dict:
        """A param tree of the run (`state.params`, `teacher`, `ema_params`) per layer: the tree
        itself when nothing is stacked, else a copy of its stacked leaves sliced per layer."""
        return jax.jit(self.stacks.unstack)(tree) if self.stacks.runs else tree


def batch_loader(cfg: TrainConfig, source, mesh) -> BatchLoader:
    """The run's `BatchLoader` of `source`: `cfg.data`'s batch size, gradient accumulation and
    seed, each micro-batch sharded over `mesh`'s batch axes."""
    return BatchLoader(source, cfg.data.batch_size, cfg.data.grad_accum, cfg.data.seed,
                       lambda ndim: batch_sharding(mesh, ndim, 1))


def data_source(cfg: TrainConfig, model_config):
    """The configured example source: on-disk shards, or synthetic latents shaped for the model."""
    if cfg.data.path is not None:
        source = ShardedLatents(cfg.data.path, validate=cfg.data.validate)
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
        return ProceduralClips(spec, cfg.data.procedural.examples, cfg.data.seed,
                               render_on=cfg.data.procedural.render_on)
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


# What a checkpoint's train state holds (its metadata's "state_layout"). 2: float32 master
# weights and optimizer state for the trainable params only, the frozen ones in
# model.compute_dtype. 1 (no "state_layout"; written before 2026-12-01): every param float32
# and the optimizer state over all of them, the same as 2 when every param trains. Params and
# optimizer state of scanned blocks are stacked over the runs of its "block_stacks" (none in a
# checkpoint written before 2026-12-04: every block per layer).
STATE_LAYOUT = 2


def _meta(cfg: TrainConfig, step: int, loader: BatchLoader, guard: SkipTracker, stacks: BlockStacks) -> dict:
    return {
        "state_layout": STATE_LAYOUT,
        "block_stacks": [list(run) for run in stacks.runs],
        "guard": guard.state(),
        "step": step,
        "data_position": loader.position(step),
        "data_seed": cfg.data.seed,
        "global_batch": cfg.data.batch_size,
        "config": cfg.to_dict(),
    }


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          allow_schedule_change: bool = False) -> TrainResult:
    """Run (or continue, with `resume`) the distillation described by `cfg`.

    resume: continue from the newest good checkpoint in `checkpoint.dir` (damaged newer ones
      are moved aside with a message); a changed `steps`/`optim` section is an error unless
      `allow_schedule_change`.
    Stops: on an exception the state of the last completed step is saved (when intact and
    finite) before the error propagates; SIGTERM or Ctrl-C finish the current step, save it,
    and raise `StopRequested`. Saves in flight are always waited for. With `time_limit_s` the
    run ends normally after the first step begun once it is spent (`TrainResult.metrics["step"]`
    < `steps`). Step n + 1 is dispatched before step n's metrics are read (see the loop).

    Turns on `jax_threefry_gpu_kernel_lowering` (same random bits, one kernel per draw):
    unrolled threefry made the random init of a 1.3B model compile for minutes on GPU.
    """
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    out_of_time = OutOfTime(cfg.time_limit_s)
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    checkpointer, latest, checked = _open_checkpoints(cfg, resume, allow_schedule_change)
    try:
        return _run(cfg, mesh, checkpointer, latest, checked, progress, allow_schedule_change, out_of_time)
    finally:  # every exit path, so Orbax's background threads finish before the caller goes on
        if checkpointer is not None:
            checkpointer.close()


def _run(cfg: TrainConfig, mesh, checkpointer: Checkpointer | None, latest: int | None, checked: int | None,
         progress: bool, allow_schedule_change: bool, out_of_time: OutOfTime) -> TrainResult:
    """`train` after the checkpoints are opened (`_open_checkpoints`); the caller closes them."""
    _, abstract_params, labels, stacks = training_layout(cfg)
    shardings = param_shardings(abstract_params, mesh)
    # float32 masters for the trainable params, the frozen ones in the compute dtype
    parts, params = init_params(cfg.model, cfg.seed, shardings, labels)
    # scanned blocks' params stacked (`stacks`), as the scan reads them and the optimizer updates them
    if stacks.runs:
        parts = parts._replace(stacks=stacks)
        shardings, labels = stacks.stack_shardings(shardings), stacks.stack_labels(labels)
        params = jax.jit(stacks.stack, out_shardings=shardings)(params)  # the per-layer arrays are freed with `params`
    compute_dtype = DTYPES[cfg.model.compute_dtype]
    # The frozen teacher: its own copy (compute dtype) of the initial trainable weights only; it
    # reads the frozen ones from the student (`teacher_params`).
    teacher = jax.jit(lambda p: teacher_copy(p, labels, compute_dtype), out_shardings=shardings)(params)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    state_sh = state_shardings(optimizer, params, shardings, labels, mesh)
    state = init_train_state(optimizer, params, labels, cfg.seed, state_sh)

    source = data_source(cfg, parts.config)
    batch_sh = batch_shardings(mesh, {name: len(shape) for name, shape in source.shapes.items()})
    loader = batch_loader(cfg, source, mesh)

    start = 0
    guard = SkipTracker(cfg.guard.max_consecutive_skips)
    if latest is not None:
        state, start, guard = _resume(cfg, checkpointer, state, loader, allow_schedule_change, checked)
        check_frozen_unchanged(params, state.params, labels)

    step_fn = jit_train_step(make_train_step(parts, optimizer, cfg), state_sh, shardings, batch_sh, mesh,
                             cfg.compiler_options)
    sparsity = BatchSparsity(parts, source.shapes["latents"], student_mode=cfg.objective.student_attention,
                             shift=cfg.objective.shift, pure_noise_share=cfg.objective.pure_noise_share,
                             compute_dtype=compute_dtype)
    _warn(sparsity.warning(None))
    heldout = None
    if cfg.eval_every:
        spec = clip_spec(cfg.heldout_procedural, parts.config.text_dim, parts.config.in_dim)
        heldout = HeldoutEvaluation(parts, spec, cfg.eval_examples, student_mode=cfg.objective.student_attention,
                                    compute_dtype=compute_dtype, shift=cfg.objective.shift, seed=cfg.data.seed,
                                    guidance=cfg.eval_guidance)
    whole_teacher = lambda: teacher_params(state.params, teacher)
    evaluations = [{"step": start, **evaluate(heldout, state, whole_teacher())}] if heldout is not None else []
    metrics_path = cfg.metrics_path or (f"{cfg.checkpoint.dir}/metrics.jsonl" if cfg.checkpoint.dir else None)
    # Opened after the step-0 evaluation, so a failing one leaves no TensorBoard writer open.
    writers = (JsonlWriter(metrics_path), TensorBoardWriter(cfg.tensorboard_dir))
    for writer in writers:
        for record in evaluations:
            writer.write(record)
    tokens = cfg.data.batch_size * tokens_per_example(source.shapes["latents"], parts.config.patch_size)
    # one compiled call a step, not a dozen op-by-op dispatches each waited for
    schedule_lr = jax.jit(learning_rate_schedule(cfg.optim, cfg.steps))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or jax.process_index() != 0)
    metrics: dict[str, float] = {}
    postfix: dict[str, str] = {}
    done = saved = start
    read_at, probe_s = 0.0, 0.0  # when the last step's metrics were read; probe seconds since

    def finish(step: int, step_metrics: dict, achieved: float | None, started: float, logged: bool, last: bool,
               evaluation: dict | None = None) -> None:
        """Read step `step`'s metrics (waiting for it), log them with `evaluation` (held-out
        metrics of its params, when due) and let the guard see whether it was skipped."""
        nonlocal metrics, read_at, probe_s
        metrics = host_scalars(step_metrics)
        now = time.perf_counter()
        # from the previous read (or this step's start, when nothing was in flight), less the probes
        elapsed = now - max(started, read_at) - probe_s
        read_at, probe_s = now, 0.0
        metrics.update(step=step + 1, lr=float(schedule_lr(step)), step_time=elapsed, tokens_per_s=tokens / elapsed)
        if step == start:  # this run's first step compiled the step function (inside step_time)
            metrics["compile_s"], metrics["lower_s"] = step_fn.compile_s, step_fn.lower_s
        postfix.update(loss=f"{metrics['loss']:.4g}", step_s=f"{elapsed:.2f}", tok_s=f"{tokens / elapsed:.3g}")
        if achieved is not None and not metrics["skipped"]:  # a non-finite batch measures nothing
            metrics["block_sparsity"] = achieved
            postfix["sparsity"] = f"{achieved:.3f}"
            _warn(sparsity.warning(achieved))
        bar.set_postfix(postfix)
        if evaluation is not None:
            evaluations.append({"step": step + 1, **evaluation})
            metrics.update(evaluation)
            if progress and jax.process_index() == 0:
                bar.write(" ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))
        if logged or last or metrics["skipped"]:
            for writer in writers:
                writer.write(metrics)
        note = guard.record(step + 1, metrics["skipped"] > 0,
                            lambda: batches.call(nonfinite_examples, source, loader.indices(step)))
        if note is not None:
            tqdm.write(note, file=sys.stderr)

    # Step n + 1 is dispatched before step n's metrics are read, so the host's work (reading the
    # metrics, logging, dispatching) overlaps the device's. Steps that evaluate, save or end the
    # run are read before the next is dispatched (the next step takes over their state's buffers),
    # and so is a step whose skip would stop the run (the guard's limit).
    in_flight = None  # the arguments of `finish` for the step dispatched but not yet read
    with StopRequests() as stop, BatchPrefetcher(loader, cfg.steps, cfg.data.prefetch) as batches:
        try:
            for step in bar:
                if stop.signum is not None:
                    break
                if in_flight is not None and guard.consecutive + 1 >= guard.limit:
                    finish(*in_flight)
                    in_flight = None
                last = step + 1 == cfg.steps or out_of_time()
                logged = (step + 1) % cfg.log_every == 0 or last
                started = time.perf_counter()
                batch = batches.batch(step)  # starts reading the next one, overlapping this step
                probe_start = time.perf_counter()
                # measured before the step, on the params its loss is computed with
                achieved = sparsity(state.params, state.rng, step, batch) if logged else None
                probe_s += time.perf_counter() - probe_start
                state, step_metrics = step_fn(state, teacher, batch)
                done = step + 1
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = (step, step_metrics, achieved, started, logged, last)
                evaluate_now = heldout is not None and ((step + 1) % cfg.eval_every == 0 or last)
                save_now = checkpointer is not None and ((step + 1) % cfg.checkpoint.every == 0 or last)
                if evaluate_now or save_now or last:
                    finish(*in_flight, evaluate(heldout, state, whole_teacher()) if evaluate_now else None)
                    in_flight = None
                if save_now:
                    checkpointer.save(step + 1, state, _meta(cfg, step + 1, loader, guard, parts.stacks))
                    saved = step + 1
                if last:
                    break
            if in_flight is not None:  # stopped on request after dispatching it
                finish(*in_flight)
        except BaseException as err:
            if checkpointer is not None:
                _save_on_exit(checkpointer, state, done, saved, _meta(cfg, done, loader, guard, parts.stacks), err)
            raise
        finally:
            bar.close()
            writers[1].close()
        if checkpointer is not None:
            saved = _save_on_exit(checkpointer, state, done, saved, _meta(cfg, done, loader, guard, parts.stacks), None)
    if stop.signum is not None and done < cfg.steps:
        raise StopRequested(stop.signum, done, checkpointer is not None and saved == done)
    return TrainResult(state, whole_teacher(), metrics, param_checksum(state.params, mesh), mesh, evaluations,
                       ema_params(state), parts.stacks)


class OutOfTime:
    """Callable: whether `limit_s` wall-clock seconds (None: never) have passed since it was made.
    With several processes, process 0's clock decides for all (one small broadcast per call), so
    every process ends the run after the same step."""

    def __init__(self, limit_s: float | None):
        self.deadline = None if limit_s is None else time.perf_counter() + limit_s

    def __call__(self) -> bool:
        if self.deadline is None:
            return False
        spent = time.perf_counter() >= self.deadline
        if jax.process_count() > 1:
            spent = bool(multihost_utils.broadcast_one_to_all(np.bool_(spent)))
        return spent


def evaluate(heldout: HeldoutEvaluation, state: TrainState, teacher: dict) -> dict[str, float]:
    """The held-out metrics of `state.params` against the whole `teacher` tree and, when the run
    keeps an EMA (`optim.ema_decay`), the same of the EMA model with the suffix "_ema"
    (`heldout_flow_loss_ema`, ...)."""
    record = heldout(state.params, teacher)
    ema = ema_params(state)
    if ema is not None:
        record.update({f"{name}_ema": value for name, value in heldout(ema, teacher).items()})
    return record


def _warn(line: str | None) -> None:
    """Print `line` (if any) on stderr from process 0, above the progress bar."""
    if line is not None and jax.process_index() == 0:
        tqdm.write(line, file=sys.stderr)


def _open_checkpoints(cfg: TrainConfig, resume: bool,
                      allow_schedule_change: bool) -> tuple[Checkpointer | None, int | None, int | None]:
    """(checkpointer or None, latest step or None, the step whose metadata was checked or None);
    checks before anything is built that a resume is asked for and that the newest checkpoint's
    settings fit `cfg` (when its metadata reads)."""
    if cfg.checkpoint.dir is None:
        if resume:
            raise ValueError("--resume needs checkpoint.dir (where the checkpoints to continue from are)")
        return None, None, None
    checkpointer = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
    try:
        latest = checkpointer.latest_step()
        if latest is not None and not resume:
            raise ValueError(f"checkpoint.dir {cfg.checkpoint.dir!r} already holds step {latest}; pass --resume or use a new dir")
        if latest is None and resume:
            print(f"--resume: no checkpoint in {cfg.checkpoint.dir!r} yet; starting from step 0", file=sys.stderr, flush=True)
        meta = checkpointer.read_meta(latest) if latest is not None else None
        if meta is not None:
            check_resumable(cfg, meta, allow_schedule_change)
    except BaseException:
        checkpointer.close()
        raise
    return checkpointer, latest, None if meta is None else latest


def check_resumable(cfg: TrainConfig, meta: dict, allow_schedule_change: bool) -> None:
    """ValueError when checkpoint metadata `meta` belongs to a different data order, to a train
    state of another layout (`check_state_layout`), or (unless `allow_schedule_change`) to a
    different `steps` / `optim` section than `cfg`."""
    if meta["data_seed"] != cfg.data.seed or meta["global_batch"] != cfg.data.batch_size:
        raise ValueError("data.seed / data.batch_size differ from the checkpoint's; resuming would change the data order")
    check_state_layout(cfg, meta)
    check_block_stacks(cfg, meta)
    changed = schedule_changes(meta.get("config", {}), cfg.to_dict())
    if changed and not allow_schedule_change:
        raise ValueError(f"--resume: {', '.join(changed)} differ from the checkpoint's config, which changes the "
                         "schedule or the optimizer (learning rate, AdamW, clipping, EMA decay) mid-run; keep them, "
                         "or pass --allow-schedule-change to accept it")


def check_state_layout(cfg: TrainConfig, meta: dict) -> None:
    """ValueError when the train state of the checkpoint with metadata `meta` is laid out
    otherwise than `cfg`'s: an EMA (`optim.ema_decay`) turned on or off (a changed decay is a
    schedule change), another `optim.trainable` (the checkpoint holds optimizer state and
    float32 masters for its own trainable params only), with frozen params another
    `model.compute_dtype` (they are held in it), or frozen params from before `STATE_LAYOUT` 2
    (float32, optimizer state over every param). `--allow-schedule-change` does not cover these."""
    saved = meta.get("config", {})
    ema = saved.get("optim", {}).get("ema_decay")  # None also for checkpoints from before the option
    if (ema is None) != (cfg.optim.ema_decay is None):
        was, now = (json.dumps(value) for value in (ema, cfg.optim.ema_decay))
        raise ValueError(f"--resume: optim.ema_decay {was} -> {now} turns the EMA of the trained parameters "
                         f"{'on' if ema is None else 'off'}, but the checkpoint's optimizer state holds "
                         f"{'none' if ema is None else 'one'}; resume with optim.ema_decay={was} or start a new run")
    trainable = saved.get("optim", {}).get("trainable", cfg.optim.trainable)
    if trainable != cfg.optim.trainable:
        raise ValueError(f"--resume: optim.trainable {trainable!r} -> {cfg.optim.trainable!r} differs from the "
                         "checkpoint's, which holds float32 master weights and optimizer state for its trainable "
                         f"parameters only; resume with optim.trainable={trainable!r} or start a new run")
    if cfg.optim.trainable is None:
        return
    if meta.get("state_layout", 1) != STATE_LAYOUT:
        raise ValueError("--resume: the checkpoint was written by an earlier sparge-jax that held frozen parameters "
                         "in float32 with optimizer state over every parameter; with optim.trainable set this "
                         "version cannot resume it: finish the run with the version that started it, or start a new run")
    dtype = saved.get("model", {}).get("compute_dtype", cfg.model.compute_dtype)
    if dtype != cfg.model.compute_dtype:
        raise ValueError(f"--resume: model.compute_dtype {dtype!r} -> {cfg.model.compute_dtype!r} differs from the "
                         "checkpoint's, which holds the frozen parameters (optim.trainable) in it; resume with "
                         f"model.compute_dtype={dtype!r} or start a new run")


def training_layout(cfg: TrainConfig) -> tuple[ModelParts, dict, Any, BlockStacks]:
    """(abstract model parts, abstract per-layer params (`jax.ShapeDtypeStruct`s), their trainable
    labels (`optim.trainable`), the block stacks a run of `cfg` trains in (`BlockStacks.for_training`))."""
    parts, like = abstract_model(cfg.model)
    labels = trainable_labels(like, cfg.optim.trainable)
    return parts, like, labels, BlockStacks.for_training(parts, like, labels, cfg.objective.student_attention)


def check_block_stacks(cfg: TrainConfig, meta: dict) -> None:
    """ValueError when the checkpoint with metadata `meta` holds the blocks' params stacked over
    other runs of layers than a run of `cfg` would (`training_layout`): scanned blocks turned on
    or off (`model.overrides.scan_layers`), or runs cut elsewhere (dense layers, per-layer
    methods, `optim.trainable`)."""
    saved = [tuple(run) for run in meta.get("block_stacks", [])]
    runs = list(training_layout(cfg)[3].runs)
    if saved == runs:
        return
    where = lambda found: ("every block per layer" if not found else  # noqa: E731
                           "stacked over layers " + ", ".join(f"{a}..{b - 1}" for a, b in found))
    if not saved or not runs:  # scanned blocks turned on or off: the other setting computes the same values
        hint = f"resume with model.overrides.scan_layers={'false' if not saved else 'true'}"
    else:
        hint = "resume with the checkpoint's model.overrides and optim.trainable"
    raise ValueError(f"--resume: the checkpoint holds the DiT blocks' params {where(saved)}; this config trains "
                     f"them {where(runs)}; {hint}, or start a new run")


def _resume(cfg: TrainConfig, checkpointer: Checkpointer, state: TrainState, loader: BatchLoader,
            allow_schedule_change: bool, checked: int | None) -> tuple[TrainState, int, SkipTracker]:
    """Restore the newest good checkpoint and check it belongs to this run: (state, step, guard counts).
    checked: the step whose metadata `_open_checkpoints` already checked (`check_resumable`, which
    builds an abstract model) or None; not checked again when it is the one restored."""
    found = checkpointer.restore_latest_good(state)
    if found is None:
        raise ValueError(f"--resume: no usable checkpoint in {cfg.checkpoint.dir!r} (every step is damaged, "
                         "see above); start a new checkpoint.dir or restore a backup")
    start, state, meta = found
    if start != checked:  # an older checkpoint than the one whose metadata was checked first
        check_resumable(cfg, meta, allow_schedule_change)
    if meta["data_position"] != loader.position(start):
        raise ValueError(f"checkpoint data position {meta['data_position']} does not match step {start}")
    return state, start, SkipTracker(cfg.guard.max_consecutive_skips, **meta.get("guard", {}))


def check_frozen_unchanged(initial: dict, restored: dict, labels) -> None:
    """ValueError naming the leaves that `labels` marks frozen but differ between the initial
    params and the restored ones (a resume whose `optim.trainable` freezes parameters an earlier
    run trained): the teacher reads its frozen leaves from the student, so it would no longer be
    the initial model."""
    if "freeze" not in jax.tree.leaves(labels):
        return
    equal = jax.jit(lambda a, b: jax.tree.map(lambda x, y: jnp.array_equal(x, y), a, b))(initial, restored)
    changed = [path_string(path) for (path, same), label in
               zip(jax.tree_util.tree_flatten_with_path(equal)[0], jax.tree.leaves(labels))
               if label == "freeze" and not bool(same)]
    if changed:
        raise ValueError(f"--resume: optim.trainable freezes parameters the checkpoint has trained ({', '.join(changed[:3])}"
                         f"{', ...' if len(changed) > 3 else ''}); the teacher reads frozen parameters from the student, "
                         "so resume with the checkpoint's optim.trainable or start a new run")


def schedule_changes(saved: dict, current: dict) -> list[str]:
    """"key: old -> new" for each of `steps` and the `optim` settings that differ between two
    config dicts (settings the saved one lacks, from older versions, are not compared)."""
    missing = object()
    pairs = [("steps", saved.get("steps", missing), current["steps"])]
    pairs += [(f"optim.{k}", saved.get("optim", {}).get(k, missing), v) for k, v in current["optim"].items()]
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in pairs if old is not missing and old != new]


def _save_on_exit(checkpointer: Checkpointer, state: TrainState, done: int, saved: int, meta: dict,
                  error: BaseException | None) -> int:
    """On the way out: save the state of step `done` unless it is saved already, was lost to a
    failed step (donated buffers) or the user pressed Ctrl-C twice; then wait for the saves in
    flight (`train` closes the checkpointer). Returns the newest step saved."""
    intact = not any(x.is_deleted() for x in jax.tree.leaves(state))
    if done > saved and intact and not isinstance(error, KeyboardInterrupt):
        try:
            checkpointer.save(done, state, meta)
            saved = done
        except Exception as save_error:
            if error is None:
                raise
            print(f"could not save step {done} on the way out: {save_error}", file=sys.stderr, flush=True)
    checkpointer.wait()
    return saved
