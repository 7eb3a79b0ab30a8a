"""Train the miniature Wan teacher from scratch on procedural clips (GPU), then sample it.

    python benchmarks/train_teacher.py --out OUT [--config train/configs/teacher.json] [--budget-s 270 | --steps N]
        [--limit-s S] [key=value overrides ...]

Uses `--config` (default `train/configs/teacher.json`: dense self-attention, flow-matching loss
only) through the project's trainer. A short probe run times a step; the real run then gets as
many steps as fit in `--budget-s` seconds (rounded down to 100s, so the learning-rate schedule is set before it
starts). The probe's step time leaves out the held-out evaluations and logging: the real run's
steps took 1.1-1.3x as long on the H200. `--steps N` skips the probe (~50 s of device time) and
plans N steps (logged steps on the H200 with clips rendered there, `data.procedural.render_on=
accelerator`, the shipped recipe: ~88 ms at the study size, batch 16; ~67 ms at 8 x 64 x 64, batch 32). `--limit-s` (default 1.5 x the budget) caps the training
call's wall time (`time_limit_s`): past it the run ends early and what it trained is exported all
the same (the summary's `steps` against `steps_planned`). With `optim.ema_decay` set
(teacher.json: 0.999) the exported teacher is the EMA of the trained weights
(`TrainResult.ema_params`), else the trained weights themselves; the samples, held-out losses
and attention statistics below are those of the exported weights. Writes to OUT:
`teacher.tar` (converted-model directory: config.json + params/, bf16), `teacher_metrics.jsonl`
(loss curve and held-out evaluations, of the EMA model too: `heldout_*_ema`),
`teacher_samples.npz` (uint8 RGB of held-out clips and of dense CFG samples under their
captions) and `teacher_summary.json` (steps, timings, which weights were exported, the schedule's
shift, which also sets the noise levels of the held-out losses and the samples' steps: with
`objective.shift=1e6`, a pure-noise stage, those are the pure-noise loss and one pure-noise
prediction; held-out flow loss at the study and demo clip sizes, per-layer attention concentration). Samples, held-out
losses and attention statistics are at the study size (the clip size of `--config`, without the
overrides; the captions are the run's) whatever size the stage trained on: a stage on smaller clips is e.g.
`data.procedural.height=64 data.procedural.width=64` (its in-loop held-out evaluations are at its
own size).

`--no-train model.weights=DIR` trains nothing and writes the samples and summary of the weights in
DIR (CPU or GPU): a stage's read-out taken again, e.g. `--no-train --samples 4 model.weights=train/teacher
data.seed=3` gives the shipped stage 5's (its samples are of the held-out clips of its `data.seed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from teacher_compare import DEMO_SIZE, flow_evaluations

from sparge_jax.models.checkpoint import save_wan_params
from train.config import load_config
from train.generate import attention_concentration, generate, make_velocity
from train.loop import train
from train.model import DTYPES, abstract_model, init_on_device
from train.procedural import ProceduralClips, caption, clip_spec, latents_to_rgb

CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "teacher.json"


def probe_step_seconds(config: Path, overrides: list[str], probe_steps: int) -> float:
    """Median logged step time of a short run of `config` with `overrides` (its first 5 steps,
    compiling, left out)."""
    probe_metrics = Path(tempfile.mkdtemp()) / "probe.jsonl"
    probe = load_config(config, [*overrides, f"steps={probe_steps}", "eval_every=0", "log_every=1",
                                 f"metrics_path={probe_metrics}"])
    train(probe, progress=False)
    times = [json.loads(line)["step_time"] for line in probe_metrics.read_text().splitlines()][5:]
    return float(np.median(times))


def train_stage(args, out: Path, start: float):
    """Train one stage as `args` say; export its weights to OUT/teacher.tar (bf16). Returns the
    config, the model parts, the exported weights read back as float32 and the training's part
    of the summary."""
    step_s, steps = None, args.steps
    if steps is None:
        step_s = probe_step_seconds(args.config, args.overrides, args.probe_steps)
        steps = max(100, int(args.budget_s / step_s) // 100 * 100)
        print(f"probe: {step_s * 1000:.1f} ms/step -> {steps} steps ({time.perf_counter() - start:.0f} s so far)",
              flush=True)

    limit_s = 1.5 * args.budget_s if args.limit_s is None else args.limit_s
    cfg = load_config(args.config, [*args.overrides, f"steps={steps}", f"metrics_path={out / 'teacher_metrics.jsonl'}",
                               f"time_limit_s={limit_s}"])
    tick = time.perf_counter()
    result = train(cfg, progress=False)
    train_s = time.perf_counter() - tick
    done = int(result.metrics["step"])
    print(f"trained {done} of {steps} planned steps in {train_s:.0f} s; final loss {result.metrics['loss']:.4f}",
          flush=True)

    parts, _ = abstract_model(cfg.model)
    exported = "raw" if result.ema_params is None else f"ema (optim.ema_decay {cfg.optim.ema_decay})"
    trained = result.per_layer(result.handed_out())
    print(f"exporting the {exported} weights as the teacher", flush=True)
    params = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), trained)
    teacher_dir = Path(tempfile.mkdtemp()) / "teacher"
    save_wan_params(str(teacher_dir), params, parts.config)
    with tarfile.open(out / "teacher.tar", "w") as tar:
        tar.add(teacher_dir, arcname="teacher")
    shutil.rmtree(teacher_dir)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # the shipped (bf16-rounded) weights
    summary = {"probe_step_s": step_s, "steps": done, "steps_planned": steps, "train_s": train_s,
               "final_loss": result.metrics["loss"], "exported_weights": exported}
    return cfg, parts, params, summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", type=Path, default=CONFIG, help="training config (the teacher's recipe)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="seconds of training steps to plan for")
    parser.add_argument("--limit-s", type=float, default=None,
                        help="wall seconds the training call may take at most (default 1.5 x --budget-s)")
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=None, help="steps to plan, without the probe")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--no-train", action="store_true",
                        help="no training: write the samples and summary of the weights in model.weights=DIR")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if args.no_train:
        if args.steps is not None:
            parser.error("--no-train trains nothing: drop --steps")
        cfg = load_config(args.config, args.overrides)
        if cfg.model.weights is None or not Path(cfg.model.weights).is_dir():
            parser.error(f"--no-train summarises existing weights: model.weights must be a teacher directory "
                         f"(e.g. train/teacher), got {cfg.model.weights!r}")
        parts, params = init_on_device(cfg.model)
        summary = {"steps": 0, "weights": cfg.model.weights}
    else:
        cfg, parts, params, summary = train_stage(args, out, start)
    compute_dtype = DTYPES[cfg.model.compute_dtype]
    # Samples, held-out losses and attention statistics at the study size (the config's clips),
    # also after a stage trained on other clip sizes (`data.procedural.*` overrides).
    size = load_config(args.config).data.procedural
    study = dataclasses.replace(cfg.data.procedural, frames=size.frames, height=size.height, width=size.width)
    spec = clip_spec(study, parts.config.text_dim, parts.config.in_dim)
    heldout = ProceduralClips(spec, args.samples, seed=cfg.data.seed, split="heldout")
    clips = heldout.read(np.arange(args.samples))
    noise = jax.random.normal(jax.random.key(0), clips["latents"].shape, jnp.float32)
    velocity = make_velocity(parts, "dense", compute_dtype)
    samples = generate(velocity, params, noise, jnp.asarray(clips["context"]), steps=args.sample_steps,
                       shift=cfg.objective.shift, guidance=args.guidance)
    np.savez_compressed(out / "teacher_samples.npz", heldout=latents_to_rgb(clips["latents"], spec.space_to_depth),
                        samples=latents_to_rgb(samples, spec.space_to_depth),
                        captions=np.array([caption(a, spec) for a in heldout.attributes(np.arange(args.samples))]))

    sizes = {"study": (study.frames, study.height, study.width), "demo": DEMO_SIZE}
    evaluations = flow_evaluations(parts, study, sizes, 8, 0, shift=cfg.objective.shift, compute_dtype=compute_dtype)
    flow = {name: evaluation(params, params)["heldout_flow_loss"] for name, evaluation in evaluations.items()}
    concentration = {
        f"sigma_{sigma}": attention_concentration(parts, params, {k: v[:4] for k, v in clips.items()}, sigma,
                                                  block_q=parts.config.sparse.kernel.block_q,
                                                  block_k=parts.config.sparse.kernel.block_k)
        for sigma in (0.9, 0.5, 0.2)
    }
    summary = {"device": jax.devices()[0].device_kind, **summary, "shift": cfg.objective.shift,
               "heldout_flow_loss": flow, "attention_blocks_for_90pct_mass": concentration,
               "wall_s": time.perf_counter() - start}
    (out / "teacher_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
