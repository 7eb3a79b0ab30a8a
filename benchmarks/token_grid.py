"""Token-grid artifacts in generated frames: pixel steps across the model's token boundaries
against pixel steps inside its tokens (CPU, seconds).

    python benchmarks/token_grid.py [--frames docs/data/quality_frames.npz] [--keys dense ...]
        [--heldout 4] [--sample 0] [--steps 20] [--token 8] [--cell 4]

The miniature teacher sees a clip as tokens of `--token` x `--token` pixels (space-to-depth 4,
then patch 2: 8 x 8), each made of space-to-depth cells of `--cell` x `--cell` pixels. For each
axis (rows, columns), the mean absolute difference between neighbouring pixels is taken over the
pixel pairs that straddle a token boundary, over those that straddle a cell boundary inside a
token, and over those inside a cell; printed are the first two over the third. A clip rendered
by `train.procedural` has no grid (both ratios near 1); a model whose tokens carry their own
offsets draws the grid (token ratio above 1). Reads `--keys` (default: all) of an npz of frames
(`(n, height, width, 3)`, as `benchmarks/quality.py` writes `quality_frames.npz`: its dense
samples and each method's) and renders `--heldout` held-out clips of the teacher's study size
(`train/configs/teacher.json`) for comparison. `--sample N` also samples the shipped teacher
(`train/teacher`, dense, UniPC over `--steps` shifted steps, guidance 1) from fixed noise under
the captions of the first N held-out clips, as `benchmarks/quality.py` does for its dense
reference (on 2 CPU cores about a minute per clip at 20 steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train.config import load_config
from train.generate import generate, make_velocity
from train.model import DTYPES, abstract_model, init_params
from train.procedural import ProceduralClips, clip_spec, latents_to_rgb

ROOT = Path(__file__).resolve().parents[1]


def grid_step_ratios(frames, token: int = 8, cell: int = 4) -> dict[str, tuple[float, float]]:
    """{"rows": ..., "cols": ...}: (token-boundary steps / in-cell steps, cell-boundary steps
    inside tokens / in-cell steps), mean absolute neighbour differences of `frames`
    `(..., height, width, channels)` along that axis (rows: vertical neighbours)."""
    if token % cell:
        raise ValueError(f"token ({token}) must be a multiple of cell ({cell})")
    f = np.asarray(frames, np.float64)
    out = {}
    for name, axis in (("rows", -3), ("cols", -2)):
        steps = np.abs(np.diff(f, axis=axis))
        steps = np.moveaxis(steps, axis, -1).reshape(-1, steps.shape[axis]).mean(axis=0)
        after = np.arange(1, f.shape[axis])  # steps[i] is between pixels after - 1 and after
        at_token = after % token == 0
        at_cell = (after % cell == 0) & ~at_token
        inside = ~(at_token | at_cell)
        out[name] = (float(steps[at_token].mean() / steps[inside].mean()),
                     float(steps[at_cell].mean() / steps[inside].mean()))
    return out


def _frames(latents, space_to_depth: int) -> np.ndarray:
    """uint8 `(clips * frames, height, width, 3)` of latents `(clips, frames, h, w, channels)`."""
    rgb = latents_to_rgb(latents, space_to_depth)
    return rgb.reshape(-1, *rgb.shape[-3:])


def heldout_and_samples(clips: int, samples: int = 0, steps: int = 20) -> dict[str, np.ndarray]:
    """{"held-out clips": frames of `clips` held-out procedural clips at the teacher's size, and
    with `samples` > 0 "teacher samples": the shipped teacher's samples under the captions of
    the first `samples` of them}, each uint8 `(n * frames, height, width, 3)`."""
    cfg = load_config(ROOT / "train" / "configs" / "teacher.json", [f"model.weights={ROOT / 'train' / 'teacher'}"])
    procedural = cfg.data.procedural
    spec = clip_spec(procedural, cfg.model.overrides["text_dim"], 3 * procedural.space_to_depth ** 2)
    read = ProceduralClips(spec, max(clips, samples), seed=1, split="heldout").read(np.arange(max(clips, samples)))
    out = {"held-out clips": _frames(read["latents"][:clips], procedural.space_to_depth)} if clips else {}
    if samples:
        _, like = abstract_model(cfg.model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        parts, params = init_params(cfg.model, 0, jax.tree.map(lambda _: device, like))
        velocity = make_velocity(parts, "dense", DTYPES[cfg.model.compute_dtype])
        context = jnp.asarray(read["context"][:samples])
        noise = jax.random.normal(jax.random.key(0), read["latents"][:samples].shape, jnp.float32)
        latents = generate(velocity, params, noise, context, steps=steps, shift=cfg.objective.shift, guidance=1.0)
        out["teacher samples"] = _frames(latents, procedural.space_to_depth)
    return out


def main(argv=None) -> dict[str, dict[str, tuple[float, float]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=Path, default=ROOT / "docs" / "data" / "quality_frames.npz")
    p.add_argument("--keys", nargs="*", help="npz keys to measure (default: all)")
    p.add_argument("--heldout", type=int, default=4, help="held-out clips rendered for comparison (0: none)")
    p.add_argument("--sample", type=int, default=0, help="teacher samples under held-out captions (0: none)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of --sample")
    p.add_argument("--token", type=int, default=8, help="token size in pixels (space-to-depth x patch)")
    p.add_argument("--cell", type=int, default=4, help="space-to-depth cell size in pixels")
    args = p.parse_args(argv)
    saved = np.load(args.frames)
    missing = sorted(set(args.keys or ()) - set(saved.files))
    if missing:
        raise SystemExit(f"--keys: {missing} not in {args.frames} (it holds {sorted(saved.files)})")
    sets = {key: saved[key] for key in (args.keys or saved.files)}
    sets.update(heldout_and_samples(args.heldout, args.sample, args.steps))
    results = {name: grid_step_ratios(frames, args.token, args.cell) for name, frames in sets.items()}
    print("| frames | token boundary / inside, rows | cols | cell boundary / inside, rows | cols |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rows'][0]:.2f} | {r['cols'][0]:.2f} | {r['rows'][1]:.2f} | {r['cols'][1]:.2f} |")
    return results


if __name__ == "__main__":
    main()
