"""Does the teacher's motion follow the caption's direction words? (CPU, ~9 minutes on 2 cores at the defaults)

    python benchmarks/caption_following.py [--clips 6] [--steps 20] [--guidance 4]
        [--weights train/teacher] [--config train/configs/teacher.json] [--out OUT] [key=value ...]

Takes the first `--clips` held-out captions (seed 1) that name one shape, and gives each two
captions that differ only in that shape's direction, east and west (the renderer's velocity
turned to match, speed kept). The teacher at `--weights` samples both from the same noise
(UniPC, `--steps` shifted steps, `--guidance`); the clips rendered from the same attributes are
the reference. The shape is tracked by its caption's colour (pixels within 0.3 in RGB of it):
`motion_slope` is the least-squares slope of the mask's horizontal centroid over the first 6
frames, in pixels a frame (positive: east). A teacher that follows the words gives east a larger
slope than west, as the rendered clips do (+2.4 to +3.6 against -2.4 to -3.6 at the defaults);
one that ignores them gives the two the same slope, whatever it is. Prints a table per clip and
the mean east-minus-west slope of both; `--out` also saves the frames (npz).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from token_grid import ROOT, TEACHER_CONFIG, teacher_config, teacher_velocity

from train.generate import generate
from train.procedural import (COLOURS, ProceduralClips, context_tensor, depth_to_space, heading,
                             render_attributes)

EAST, WEST = 0, 4  # indices in train.procedural.DIRECTIONS
CANDIDATES = 400  # held-out clips searched for captions naming the shapes asked for
# overrides of the teacher config for clips of 128 x 128 pixels, where few shapes bounce in the 6 frames a course
# is read from (in 64 x 64 clips 9 of 12 test courses do): what the read-out's oracle tests render
WIDE_CLIPS = ("data.procedural.height=128", "data.procedural.width=128", "data.procedural.space_to_depth=4")


def with_direction(attrs: dict, direction: int) -> dict:
    """A copy of one clip's attributes whose first shape moves towards `direction` (an index of
    `DIRECTIONS`, 45 degrees apart from east, counter-clockwise) at its own speed."""
    out = copy.deepcopy(attrs)
    speed = float(np.linalg.norm(out["velocity"][0]))
    out["direction"][0] = direction
    out["velocity"][0] = heading(direction) * speed
    return out


def colour_mask(video: np.ndarray, colour, tolerance: float = 0.3) -> np.ndarray:
    """bool `(F, H, W)`: the pixels of `video` `(F, H, W, 3)` in [-1, 1] within `tolerance` (RGB
    distance in [0, 1] units) of `colour`."""
    rgb = (np.asarray(video, np.float64) + 1) / 2
    return np.linalg.norm(rgb - np.asarray(colour), axis=-1) < tolerance


def centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixel counts `(F,)`, centroid x `(F,)`, centroid y `(F,)`, at pixel centres) of a mask
    `(F, H, W)`; the centroid of an empty frame is 0."""
    counts = mask.sum(axis=(1, 2))
    xs = (mask.sum(axis=1) * (np.arange(mask.shape[2]) + 0.5)).sum(axis=1) / np.maximum(counts, 1)
    ys = (mask.sum(axis=2) * (np.arange(mask.shape[1]) + 0.5)).sum(axis=1) / np.maximum(counts, 1)
    return counts, xs, ys


def course(mask: np.ndarray, frames: int = 6, min_pixels: int = 20) -> tuple[float, float]:
    """(x, y) velocity in pixels a frame of the centroid of `mask` `(F, H, W)`: least-squares
    slopes over its first `frames` frames (frames with fewer than `min_pixels` pixels left out;
    NaNs with fewer than 3 left)."""
    counts, xs, ys = centroids(mask[:frames])
    keep = counts >= min_pixels
    if keep.sum() < 3:
        return float("nan"), float("nan")
    t = np.arange(len(counts))[keep]
    return float(np.polyfit(t, xs[keep], 1)[0]), float(np.polyfit(t, ys[keep], 1)[0])


def motion_slope(video: np.ndarray, colour, frames: int = 6, tolerance: float = 0.3,
                 min_pixels: int = 20) -> float:
    """Horizontal speed in pixels a frame of the pixels of `colour` (RGB in [0, 1]) in `video`
    `(F, H, W, 3)` in [-1, 1]: the x of `course` of their mask (NaN where it has too few frames)."""
    return course(colour_mask(video[:frames], colour, tolerance), frames, min_pixels)[0]


def captioned_attributes(spec, clips: int, shapes: int = 1) -> list[dict]:
    """Attributes of the first `clips` held-out clips (seed 1) whose caption names `shapes` shapes, each of a
    colour of its own (so that each is read by its colour); present shapes fill the first slots."""
    if not 1 <= shapes <= spec.max_shapes:
        raise SystemExit(f"--shapes must be 1 to data.procedural.max_shapes ({spec.max_shapes}); got {shapes}")
    source = ProceduralClips(spec, CANDIDATES, seed=1, split="heldout")
    found = [a for a in source.attributes(np.arange(CANDIDATES))
             if a["present"].sum() == shapes and len(set(a["colour"][:shapes].tolist())) == shapes][:clips]
    if len(found) < clips:
        raise SystemExit(f"--clips: only {len(found)} captions naming {shapes} shape(s) of different colours among "
                         f"{CANDIDATES} held-out clips")
    return found


def parse_sampling_args(argv, description: str, clips: int, options: dict[str, dict] | None = None):
    """(args, teacher config, clip spec) of a script that samples the teacher at `--weights`
    (`--config`: its training config) under held-out captions: `--clips` (default `clips`),
    `--steps`, `--guidance`, `--out`, the script's own `options` ({"--name": `add_argument`'s keyword
    arguments}) and key=value overrides of the config."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, settings in (options or {}).items():
        p.add_argument(flag, **settings)
    p.add_argument("--clips", type=int, default=clips)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--weights", type=Path, default=ROOT / "train" / "teacher")
    p.add_argument("--config", type=Path, default=TEACHER_CONFIG,
                   help="the training config of --weights (architecture and captions)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the teacher config (e.g. smaller clips)")
    args = p.parse_args(argv)
    if args.clips < 1 or args.steps < 1:
        p.error(f"--clips and --steps must be at least 1; got {args.clips}, {args.steps}")
    if not (args.weights / "config.json").is_file():
        p.error(f"--weights: no teacher (config.json) in {args.weights}")
    cfg, spec = teacher_config([f"model.weights={args.weights}", *args.overrides], args.config)
    return args, cfg, spec


def main(argv=None) -> dict:
    args, cfg, spec = parse_sampling_args(argv, __doc__, clips=6)
    singles = captioned_attributes(spec, args.clips)
    attrs = [with_direction(a, EAST) for a in singles] + [with_direction(a, WEST) for a in singles]
    rendered = np.asarray(render_attributes(attrs, spec))
    context = jnp.asarray(np.stack([context_tensor(a, spec) for a in attrs]))
    velocity, params = teacher_velocity(cfg.model)
    noise = jax.random.normal(jax.random.key(0), (args.clips, *spec.latent_shape), jnp.float32)
    latents = generate(velocity, params, jnp.concatenate([noise, noise]), context, steps=args.steps,
                       shift=cfg.objective.shift, guidance=args.guidance)
    sampled = np.asarray(depth_to_space(latents, spec.space_to_depth))
    colours = list(COLOURS.values())
    rows = []
    for i, a in enumerate(singles):
        colour = colours[int(a["colour"][0])]
        rows.append({name: (motion_slope(frames[i], colour), motion_slope(frames[i + args.clips], colour))
                     for name, frames in (("rendered", rendered), ("sampled", sampled))})
    print(f"Slopes in pixels a frame (positive: east), guidance {args.guidance:g}, {args.steps} steps:\n")
    print("| clip | rendered, east / west | sampled, east / west |")
    print("|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['rendered'][0]:+.2f} / {r['rendered'][1]:+.2f} | {r['sampled'][0]:+.2f} / {r['sampled'][1]:+.2f} |")
    gaps = {name: float(np.nanmean([r[name][0] - r[name][1] for r in rows])) for name in ("rendered", "sampled")}
    print(f"\nmean east minus west: rendered {gaps['rendered']:+.2f}, sampled {gaps['sampled']:+.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out / "caption_following.npz", rendered=rendered, sampled=sampled)
    return {"rows": rows, "east_minus_west": gaps}


if __name__ == "__main__":
    main()
