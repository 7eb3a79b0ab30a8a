"""How much of a clip does each caption word decide at high noise? (CPU, ~2 minutes on 2 cores)

    python benchmarks/caption_information.py [--clips 3000] [--config train/configs/teacher.json]
        [key=value ...]

At pure noise the flow-matching optimum predicts the mean clip of the caption, so the loss a
word can remove there is the between-group variance of the clips' means grouped by that word:
`sum_v p_v ||mean_v - mean||^2 / pixels`, as a share of the clips' total variance. Renders
`--clips` one-shape clips of the config's data (each attribute drawn as in training) and
estimates it for each of the shape's words (colour, shape, direction, size change, start
region), and for the direction and the start region given the other (grouping within each
value of the other, weighted): does naming where a shape starts give its direction words weight?
The estimate is unbiased: each group's clips are split in two halves and the squared norms are
inner products of the two halves' deviations (a group needs clips in both halves).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from token_grid import TEACHER_CONFIG, teacher_config

from train.procedural import (COLOURS, DIRECTIONS, REGIONS, SHAPES, SIZE_CHANGES, draw_attributes, render_attributes,
                              start_regions)

BATCH = 64


def between_group_share(sums: np.ndarray, counts: np.ndarray, total_var: float) -> float:
    """Unbiased between-group variance as a share of `total_var`, from per-group, per-half sums
    `sums` `(groups, 2, pixels)` and counts `(groups, 2)`: sum over groups of the group's share
    times the inner product of its two halves' deviations from their half's overall mean, per
    pixel. Groups missing a half are left out (none left: 0)."""
    both = (counts > 0).all(axis=1)
    if not both.any():
        return 0.0
    means = sums[both] / counts[both][..., None]
    overall = sums.sum(axis=0) / counts.sum(axis=0)[:, None]
    deviations = means - overall[None]
    weights = counts[both].sum(axis=1) / counts[both].sum()
    inner = np.einsum("gp,gp->g", deviations[:, 0], deviations[:, 1]) / sums.shape[-1]
    return float((weights * inner).sum() / total_var)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=3000)
    p.add_argument("--config", type=Path, default=TEACHER_CONFIG)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config's data (e.g. smaller clips)")
    args = p.parse_args(argv)
    if args.clips < 4:
        p.error(f"--clips must be at least 4; got {args.clips}")
    _, spec = teacher_config(args.overrides, args.config)
    pixels = int(np.prod(spec.latent_shape))
    sizes = {"colour": len(COLOURS), "shape": len(SHAPES), "size change": len(SIZE_CHANGES)}
    # per value and half: sums of the clips; direction and start region jointly (8 x 9 cells)
    sums = {name: np.zeros((n, 2, pixels)) for name, n in sizes.items()}
    cells = np.zeros((len(DIRECTIONS), len(REGIONS), 2, pixels))
    counts = {name: np.zeros((n, 2)) for name, n in sizes.items()}
    cell_counts = np.zeros((len(DIRECTIONS), len(REGIONS), 2))
    total, total_sq = np.zeros(pixels), 0.0
    for first in range(0, args.clips, BATCH):
        attrs = [draw_attributes(spec, 0, "train", i) for i in range(first, min(first + BATCH, args.clips))]
        for a in attrs:
            a["present"] = np.arange(spec.max_shapes) < 1
        clips = np.asarray(render_attributes(attrs, spec), np.float64).reshape(len(attrs), pixels)
        total += clips.sum(axis=0)
        total_sq += float((clips ** 2).sum())
        for i, a in enumerate(attrs):
            half = (first + i) % 2
            for name, key in (("colour", "colour"), ("shape", "shape"), ("size change", "change")):
                sums[name][a[key][0], half] += clips[i]
                counts[name][a[key][0], half] += 1
            cell = (a["direction"][0], start_regions(a, spec)[0], half)
            cells[cell] += clips[i]
            cell_counts[cell] += 1
    mean = total / args.clips
    total_var = total_sq / (args.clips * pixels) - float(mean @ mean) / pixels
    shares = {name: between_group_share(sums[name], counts[name], total_var) for name in sizes}
    shares["direction"] = between_group_share(cells.sum(axis=1), cell_counts.sum(axis=1), total_var)
    shares["start region"] = between_group_share(cells.sum(axis=0), cell_counts.sum(axis=0), total_var)

    def given(axis: int) -> float:
        """The other word's share within each value of the word on `axis` (0: direction, 1:
        start region) of the cells, weighted by that value's clips."""
        blocks = np.moveaxis(cells, axis, 0), np.moveaxis(cell_counts, axis, 0)
        weights = blocks[1].sum(axis=(1, 2)) / cell_counts.sum()
        return float(sum(w * between_group_share(s, c, total_var) for w, s, c in zip(weights, *blocks)))

    shares["direction | start region"] = given(1)
    shares["start region | direction"] = given(0)
    print(f"{args.clips} one-shape clips of {spec.frames} x {spec.height} x {spec.width}: share of the clips' "
          f"variance (per pixel {total_var:.4f}) that each word's value decides, the loss it can remove at pure noise\n")
    print("| word | share of variance |")
    print("|---|---|")
    for name, share in shares.items():
        print(f"| {name} | {share:.5f} |")
    return shares


if __name__ == "__main__":
    main()
