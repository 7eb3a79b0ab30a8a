"""Token-grid artifacts in generated frames: pixel steps across the model's token boundaries
against pixel steps inside its tokens (CPU, seconds to minutes).

    python benchmarks/token_grid.py [--frames docs/data/quality_frames.npz] [--keys dense ...]
        [--heldout 4] [--sample 0] [--steps 20] [--token T] [--cell C]
        [--predict 0] [--levels 0.1 0.3 0.5 0.7 0.9 0.97] [--weights DIR ...] [--config FILE]
        [--dtype float32]

The miniature teacher sees a clip as tokens of `--token` x `--token` pixels (default: those of `--config`,
space-to-depth x patch; the shipped teacher's 2 x 2 = 4, the previous teacher's 4 x 2 = 8), each made of
space-to-depth cells of `--cell` x `--cell` pixels (default: the config's space-to-depth). For each
axis (rows, columns), the mean absolute difference between neighbouring pixels is taken over the
pixel pairs that straddle a token boundary, over those that straddle a cell boundary inside a
token, and over those inside a cell; printed are the first two over the third. A clip rendered
by `train.procedural` has no grid (both ratios near 1); a model whose tokens carry their own
offsets draws the grid (token ratio above 1). Reads `--keys` (default: all) of an npz of frames
(`(n, height, width, 3)`, as `benchmarks/quality.py` writes `quality_frames.npz`: its dense
samples and each method's; the committed one is the shipped teacher's; the previous teacher's is
`docs/data/quality_128px_frames.npz`, read it with `--token 8 --cell 4`) and renders `--heldout` held-out clips of the teacher's study size
(`train/configs/teacher.json`) for comparison. `--sample N` also samples the shipped teacher
(`train/teacher`, dense, UniPC over `--steps` shifted steps, guidance 1) from fixed noise under
the captions of the first N held-out clips, as `benchmarks/quality.py` does for its dense
reference (on 2 CPU cores about a minute per clip at 20 steps).

`--predict N` measures where the grid comes from, in one-step predictions: the first N
held-out clips are noised to each of `--levels` s (fixed noise), and each of `--weights`
(teacher directories trained with `--config`, default `train/teacher` and
`train/configs/teacher.json`, whose held-out clips and captions are used; earlier stages can
be checked out from git) predicts the clean clip x0 = x_s - s v in one forward. Per level: the
prediction's MSE, its token grid, the share of its error's energy in per-token means (the
token's offset over its 8 x 8 x 3 values; white noise would put 1/192 there) and the "DC leak":
the regression slope of the per-token mean error on the per-token mean of the noise, over s
(0: the token's share of the noise removed, 1: left in as it came). `--dtype` sets the forward's
compute dtype (default: the config's, bfloat16). On 2 CPU cores about 35 s per level and weights at N = 4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train.config import load_config
from train.generate import generate, make_velocity
from train.model import DTYPES, init_on_device, wan_config
from train.procedural import ProceduralClips, clip_spec, latents_to_rgb

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "train" / "configs" / "teacher.json"


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


def teacher_config(overrides: list[str] = (), config: Path = TEACHER_CONFIG):
    """(the teacher's training `config` with the shipped weights and `overrides`, its procedural
    clip spec)."""
    cfg = load_config(config, [f"model.weights={ROOT / 'train' / 'teacher'}", *overrides])
    procedural = cfg.data.procedural
    return cfg, clip_spec(procedural, cfg.model.overrides["text_dim"], 3 * procedural.space_to_depth ** 2)


def _heldout(clips: int, overrides: list[str] = (), config: Path = TEACHER_CONFIG):
    """(teacher `config`, its procedural clip spec, the first `clips` held-out clips (seed 1) as
    `ProceduralClips.read` gives them)."""
    cfg, spec = teacher_config(overrides, config)
    return cfg, spec, ProceduralClips(spec, clips, seed=1, split="heldout").read(np.arange(clips))


def teacher_velocity(model_settings):
    """(jitted dense velocity `(params, x, t, context)`, params) of the teacher `model_settings`
    on one device."""
    parts, params = init_on_device(model_settings)
    return make_velocity(parts, "dense", DTYPES[model_settings.compute_dtype]), params


def heldout_and_samples(clips: int, samples: int = 0, steps: int = 20) -> dict[str, np.ndarray]:
    """{"held-out clips": frames of `clips` held-out procedural clips at the teacher's size, and
    with `samples` > 0 "teacher samples": the shipped teacher's samples under the captions of
    the first `samples` of them}, each uint8 `(n * frames, height, width, 3)`."""
    if not max(clips, samples):
        return {}
    cfg, spec, read = _heldout(max(clips, samples))
    s2d = cfg.data.procedural.space_to_depth
    out = {"held-out clips": _frames(read["latents"][:clips], s2d)} if clips else {}
    if samples:
        velocity, params = teacher_velocity(cfg.model)
        context = jnp.asarray(read["context"][:samples])
        noise = jax.random.normal(jax.random.key(0), read["latents"][:samples].shape, jnp.float32)
        latents = generate(velocity, params, noise, context, steps=steps, shift=cfg.objective.shift, guidance=1.0)
        out["teacher samples"] = _frames(latents, s2d)
    return out


def token_means(latents, patch: int = 2) -> np.ndarray:
    """Per-token means `(n, frames, h // patch, w // patch)` float64 of latents `(n, frames, h, w,
    channels)` over each token's `patch` x `patch` cells and its channels."""
    x = np.asarray(latents, np.float64)
    n, f, h, w, c = x.shape
    return x.reshape(n, f, h // patch, patch, w // patch, patch, c).mean(axis=(3, 5, 6))


def prediction_errors(x0, noise, predicted, s: float, patch: int = 2) -> dict[str, float]:
    """Of a one-step prediction `predicted` of the clean latents `x0` from x_s = (1 - s) x0 + s
    `noise` (all `(n, frames, h, w, channels)`): "mse"; "token_share", the share of the error's
    energy in its per-token means; "dc_leak", the least-squares slope of the per-token mean
    error on the per-token mean noise, divided by s (the fraction of the noise's per-token
    offset the prediction keeps)."""
    err = np.asarray(predicted, np.float64) - np.asarray(x0, np.float64)
    per_token = np.asarray(x0).shape[-1] * patch * patch
    e, m = token_means(err, patch).ravel(), token_means(noise, patch).ravel()
    return {"mse": float(np.mean(err ** 2)), "token_share": float(per_token * (e @ e) / np.sum(err ** 2)),
            "dc_leak": float((e @ m) / (m @ m) / s)}


def one_step_predictions(clips: int, levels, weights: Path, dtype: str | None = None,
                         token: int = 8, cell: int = 4, config: Path = TEACHER_CONFIG) -> list[dict]:
    """Per noise level s of `levels`: `prediction_errors` and the token grid ("rows", "cols":
    token-boundary / in-cell step ratios) of the teacher at `weights` (trained with `config`)
    one-step clean-clip predictions of the first `clips` held-out clips of `config` (fixed
    noise, key 0)."""
    overrides = [f"model.weights={weights}", *([f"model.compute_dtype={dtype}"] if dtype else [])]
    cfg, _, read = _heldout(clips, overrides, config)
    velocity, params = teacher_velocity(cfg.model)
    x0, context = jnp.asarray(read["latents"]), jnp.asarray(read["context"])
    noise = jax.random.normal(jax.random.key(0), x0.shape, jnp.float32)
    rows = []
    for s in levels:
        x_s = (1 - s) * x0 + s * noise
        predicted = np.asarray(x_s - s * velocity(params, x_s, jnp.full((clips,), 1000.0 * s), context))
        grid = grid_step_ratios(_frames(predicted, cfg.data.procedural.space_to_depth), token, cell)
        rows.append({"level": s, **prediction_errors(x0, noise, predicted, s, token // cell),
                     "rows": grid["rows"][0], "cols": grid["cols"][0]})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=Path, default=ROOT / "docs" / "data" / "quality_frames.npz")
    p.add_argument("--keys", nargs="*", help="npz keys to measure (default: all)")
    p.add_argument("--heldout", type=int, default=4, help="held-out clips rendered for comparison (0: none)")
    p.add_argument("--sample", type=int, default=0, help="teacher samples under held-out captions (0: none)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of --sample")
    p.add_argument("--token", type=int, default=None,
                   help="token size in pixels (default: --config's space-to-depth x patch)")
    p.add_argument("--cell", type=int, default=None, help="space-to-depth cell size in pixels (default: --config's)")
    p.add_argument("--predict", type=int, default=0, help="held-out clips of the one-step predictions (0: none)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9, 0.97],
                   help="noise levels s of --predict, each in (0, 1]")
    p.add_argument("--weights", type=Path, nargs="+", default=[ROOT / "train" / "teacher"],
                   help="teacher directories of --predict (the study's architecture)")
    p.add_argument("--config", type=Path, default=TEACHER_CONFIG,
                   help="training config of --weights (architecture, clips and captions of --predict)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype of --predict (default: the teacher config's)")
    args = p.parse_args(argv)
    bad = [s for s in args.levels if not 0 < s <= 1]
    if bad:
        p.error(f"--levels must lie in (0, 1]; got {bad}")
    missing_weights = [str(w) for w in args.weights if not (w / "config.json").is_file()]
    if args.predict and missing_weights:
        p.error(f"--weights: no teacher (config.json) in {missing_weights}")
    recipe = load_config(args.config)
    cell = recipe.data.procedural.space_to_depth if args.cell is None else args.cell
    token = cell * wan_config(recipe.model).patch_size[1] if args.token is None else args.token
    saved = np.load(args.frames)
    missing = sorted(set(args.keys or ()) - set(saved.files))
    if missing:
        raise SystemExit(f"--keys: {missing} not in {args.frames} (it holds {sorted(saved.files)})")
    sets = {key: saved[key] for key in (args.keys or saved.files)}
    sets.update(heldout_and_samples(args.heldout, args.sample, args.steps))
    results = {name: grid_step_ratios(frames, token, cell) for name, frames in sets.items()}
    print("| frames | token boundary / inside, rows | cols | cell boundary / inside, rows | cols |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rows'][0]:.2f} | {r['cols'][0]:.2f} | {r['rows'][1]:.2f} | {r['cols'][1]:.2f} |")
    if args.predict:
        print("\n| weights | s | x0-prediction MSE | token grid, rows | cols | error energy in token means | DC leak |")
        print("|---|---|---|---|---|---|---|")
        for weights in args.weights:
            rows = one_step_predictions(args.predict, args.levels, weights, args.dtype, token, cell, args.config)
            results[f"predictions {weights}"] = rows
            for r in rows:
                print(f"| {weights} | {r['level']:g} | {r['mse']:.4f} | {r['rows']:.2f} | {r['cols']:.2f} | "
                      f"{r['token_share']:.3f} | {r['dc_leak']:.2f} |", flush=True)
    return results


if __name__ == "__main__":
    main()
