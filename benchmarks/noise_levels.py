"""Above which noise level can only the caption decide each attribute of a clip, and how much of
the training and of the sampler's steps lie above it, for each schedule shift? (CPU, seconds)

    python benchmarks/noise_levels.py [key=value ...] [--clips 200] [--config train/configs/teacher.json]
        [--steps 20] [--shifts 1 3 5 8 12 20]

For `--clips` one-shape clips of the config's data (attributes drawn as in training) it renders
each clip again with one attribute changed (colour, shape and size change to the next value,
the direction reversed, the start one start region further right, cyclically) and takes the
distance |d| between the two clips (L2 over all pixels; the latents are the same values folded).
At noise level sigma the input x = (1 - sigma) clip + sigma noise tells the two apart with
d' = (1 - sigma) |d| / sigma (the ideal observer of two known clips in white noise), so above
sigma_1 = |d| / (1 + |d|) (d' < 1) the noisy clip shows almost nothing of the attribute and only the
caption can decide it; below sigma_4 = |d| / (4 + |d|) (d' > 4) the input shows it plainly. A model
learns a word's effect from the training draws above sigma_1: their share, for each shift of
Wan's schedule (sigma = K s / (1 + (K - 1) s), s ~ U[0, 1)), is printed, with the number of the
sampler's `--steps` shifted steps that start above it (the steps that decide it from the words).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
from caption_following import with_direction
from caption_information import WORDS, one_shape_training_clip
from token_grid import TEACHER_CONFIG, teacher_config

from sparge_jax.sampling import shifted_sigmas
from train.procedural import DIRECTIONS, SIZE_CHANGES, render_attributes


def changed(attrs: dict, attribute: str, spec) -> dict:
    """A copy of one-shape `attrs` with the first shape's `attribute` changed: colour, shape, size
    change to the next value; direction reversed; start moved one start region (a third of the
    start range, 15-85 % of the frame) to the right, wrapping round."""
    out = copy.deepcopy(attrs)
    if attribute == "direction":
        return with_direction(out, (int(attrs["direction"][0]) + len(DIRECTIONS) // 2) % len(DIRECTIONS))
    if attribute == "start region":
        low, span = 0.15 * spec.width, 0.7 * spec.width
        out["position"][0, 0] = low + (attrs["position"][0, 0] - low + span / 3) % span
        return out
    key, values = WORDS[attribute]
    out[key][0] = (attrs[key][0] + 1) % values
    if key == "change":
        out["growth"][0] = list(SIZE_CHANGES.values())[out["change"][0]]
    return out


ATTRIBUTES = ("colour", "shape", "size change", "direction", "start region")


def distances(spec, clips: int) -> dict[str, np.ndarray]:
    """Per attribute, |d| `(clips,)` float64: the L2 distance between each of the first `clips`
    one-shape training clips (seed 0) and the same clip with that attribute `changed`."""
    attrs = [one_shape_training_clip(spec, i) for i in range(clips)]
    base = np.asarray(render_attributes(attrs, spec), np.float64)
    out = {}
    for attribute in ATTRIBUTES:
        other = np.asarray(render_attributes([changed(a, attribute, spec) for a in attrs], spec), np.float64)
        out[attribute] = np.sqrt(((other - base) ** 2).reshape(clips, -1).sum(axis=1))
    return out


def sigma_at(distance, d_prime: float):
    """The noise level at which two clips `distance` apart are told apart with `d_prime`."""
    return distance / (d_prime + distance)


def share_above(sigma, shift: float) -> float:
    """Share of training draws sigma' = K s / (1 + (K - 1) s), s ~ U[0, 1), above `sigma`."""
    return float(1.0 - sigma / (shift - (shift - 1.0) * sigma))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--config", type=Path, default=TEACHER_CONFIG, help="training config (its data)")
    p.add_argument("--shifts", type=float, nargs="+", default=[1, 3, 5, 8, 12, 20])
    p.add_argument("--steps", type=int, default=20, help="the sampler's steps")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. smaller clips)")
    args = p.parse_args(argv)
    if args.clips < 1 or args.steps < 1 or min(args.shifts) <= 0:
        p.error(f"--clips and --steps must be at least 1 and --shifts positive; got {args.clips}, {args.steps}, "
                f"{args.shifts}")
    _, spec = teacher_config(args.overrides, args.config)
    dist = distances(spec, args.clips)
    print(f"{args.clips} one-shape clips of {spec.frames} x {spec.height} x {spec.width}; |d|: distance to the clip "
          "with the attribute changed (median); sigma_1, sigma_4: the noise levels where the noisy clips are told "
          "apart with d' = 1 and 4\n")
    print("| attribute | median d | sigma_1 | sigma_4 |")
    print("|---|---|---|---|")
    result = {}
    for attribute, d in dist.items():
        median = float(np.median(d))
        result[attribute] = {"median_distance": median, "sigma_1": sigma_at(median, 1.0),
                             "sigma_4": sigma_at(median, 4.0), "share_above_sigma_1": {}, "steps_above_sigma_1": {}}
        print(f"| {attribute} | {median:.1f} | {sigma_at(median, 1.0):.4f} | {sigma_at(median, 4.0):.4f} |")
    print(f"\nShare of training draws above sigma_1 / sampler steps ({args.steps}) starting above it, per shift:\n")
    print("| attribute | " + " | ".join(f"shift {k:g}" for k in args.shifts) + " |")
    print("|---|" + "---|" * len(args.shifts))
    for attribute, r in result.items():
        cells = []
        for k in args.shifts:
            share = share_above(r["sigma_1"], k)
            steps = int((shifted_sigmas(args.steps, k)[:-1] > r["sigma_1"]).sum())
            r["share_above_sigma_1"][k], r["steps_above_sigma_1"][k] = share, steps
            cells.append(f"{share:.3f} / {steps}")
        print(f"| {attribute} | " + " | ".join(cells) + " |")
    return result


if __name__ == "__main__":
    main()
