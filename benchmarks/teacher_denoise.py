"""Where the miniature teacher's generations go wrong: held-out clips denoised from a partial
noise level (SDEdit-style) next to sampling from pure noise. Runs on the CPU or a GPU.

    python benchmarks/teacher_denoise.py --out OUT [--teacher DIR] [--config train/configs/teacher.json] [--clips 2]
        [--starts 0.3 0.6 0.9 1.0] [--steps 20] [--guidance 1] [--solver unipc] [--size study|demo]

For each start level s < 1: x_s = (1 - s) x0 + s noise of held-out clips x0 (procedural, the
clips of `--config`, the recipe the teacher was trained on, at its size; `--size demo`: the demo's clip size, `teacher_compare.DEMO_SIZE`), then the project's sampler over the steps
of the shifted `--steps`-step schedule below s. s = 1 samples the whole schedule from the noise
alone, as generation does (the result is another clip of the caption: its distance to x0 is not a
quality measure). Prints, per start level, the MSE of the sampled latents and of the one-step
prediction x0 = x_s - s v to the clean clips; writes OUT/teacher_denoise.png (4 frames of clip 0
per start level, the clean clip last) and OUT/teacher_denoise.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from teacher_compare import DEMO_SIZE

from sparge_jax.sampling import SIGMA_MAX, sample, shifted_sigmas
from train.config import load_config
from train.generate import guided_velocity, make_velocity
from train.model import DTYPES, init_on_device
from train.procedural import ProceduralClips, clip_spec, latents_to_rgb
from train.report import save_strip

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"study": [],
         "demo": [f"data.procedural.{key}={n}" for key, n in zip(("frames", "height", "width"), DEMO_SIZE)]}


def schedule_below(start: float, steps: int, shift: float) -> np.ndarray:
    """Sigmas float64 from `start` down to 0: `start`, then the `steps`-step shifted schedule's
    levels below it (the whole schedule when `start` >= its first level)."""
    full = shifted_sigmas(steps, shift)
    return full if start >= full[0] else np.concatenate([[start], full[full < start]])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", type=Path, default=ROOT / "train" / "teacher", help="converted teacher directory")
    p.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "teacher.json",
                   help="the training config of --teacher (its clips, shift and compute dtype)")
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--starts", type=float, nargs="+", default=[0.3, 0.6, 0.9, 1.0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--solver", choices=("unipc", "euler"), default="unipc")
    p.add_argument("--size", choices=tuple(SIZES), default="study")
    args = p.parse_args(argv)
    for start in args.starts:
        if not 0.0 < start <= 1.0:
            raise SystemExit(f"--starts: each level must be in (0, 1]; got {start}")

    cfg = load_config(args.config,
                      [f"model.weights={args.teacher.resolve()}", *SIZES[args.size]])
    parts, params = init_on_device(cfg.model)
    spec = clip_spec(cfg.data.procedural, parts.config.text_dim, parts.config.in_dim)
    clips = ProceduralClips(spec, args.clips, seed=1, split="heldout").read(np.arange(args.clips))
    x0, context = jnp.asarray(clips["latents"]), jnp.asarray(clips["context"])
    noise = jax.random.normal(jax.random.key(0), x0.shape, jnp.float32)
    velocity = make_velocity(parts, "dense", DTYPES[cfg.model.compute_dtype])
    v = guided_velocity(velocity, params, context, args.guidance)
    mse = lambda a: float(jnp.mean(jnp.square(a - x0)))

    results, rows = [], {}
    for start in args.starts:
        sigmas = schedule_below(start, args.steps, cfg.objective.shift)
        level = float(sigmas[0])
        x_start = noise if start >= 1.0 else (1.0 - level) * x0 + level * noise
        one_step = x_start - level * v(x_start, level, 0)
        sampled = sample(v, x_start, sigmas, solver=args.solver)
        results.append({"start": start, "sigma": level, "steps": len(sigmas) - 1,
                        "sampled_mse": mse(sampled), "one_step_x0_mse": mse(one_step)})
        name = "from noise" if start >= 1.0 else f"from {start:g}"
        print(f"{name}: sigma {level:.3f}, {len(sigmas) - 1} steps, MSE to the clip: sampled "
              f"{results[-1]['sampled_mse']:.4f}, one-step x0 {results[-1]['one_step_x0_mse']:.4f}", flush=True)
        rows[f"{name}: sampled"] = latents_to_rgb(np.asarray(sampled[0]), spec.space_to_depth)
    rows["held-out clip"] = latents_to_rgb(np.asarray(x0[0]), spec.space_to_depth)
    args.out.mkdir(parents=True, exist_ok=True)
    save_strip(args.out / "teacher_denoise.png", rows, frames=4)
    summary = {"teacher": str(args.teacher), "size": args.size, "clips": args.clips, "guidance": args.guidance,
               "solver": args.solver, "schedule_steps": args.steps, "sigma_max": SIGMA_MAX, "levels": results}
    (args.out / "teacher_denoise.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
