"""How much of a clip does each caption word decide at high noise, and how much of it has a
teacher learned? (CPU: ~1 minute for the clips; with `--weights`, ~2 s a teacher clip on 2 cores)

    python benchmarks/caption_information.py [--clips 3000] [--config train/configs/teacher.json]
        [--weights DIR --teacher-clips 288] [key=value ...]

At pure noise the flow-matching optimum predicts the mean clip of the caption, so the loss a
word can remove there is the between-group variance of the clips' means grouped by that word:
`sum_v p_v ||mean_v - mean||^2 / pixels`, as a share of the clips' total variance. Renders
`--clips` one-shape clips of the config's data (each attribute drawn as in training, captions
kept) and estimates it for each of the shape's words (colour, shape, direction, size change,
start region), and for the direction and the start region given the other (grouping within each
value of the other, weighted): does naming where a shape starts give its direction words weight?
The estimate is unbiased: each group's clips are split in two halves and the squared norms are
inner products of the two halves' deviations (a group needs clips in both halves).

With `--weights` (a teacher trained on `--config`'s captions), the same groupings are applied to
the teacher's clean-clip predictions at pure noise (`noise - v(noise, t = 1000, caption)`,
conditional, no guidance) of the first `--teacher-clips` clips' captions, one noise each. A
teacher at the optimum predicts each caption's mean clip, whose grouping by a word has the data's
between-group variance, so the ratio of the two shares is how much the teacher's predictions
depend on the word at pure noise (1: as much as the data's means do; 0: it ignores the word).
That ratio holds for any mapping of words to clips, the data's or another; the aligned ratio
checks the mapping: the slope of the teacher's group means on the data's (their deviations'
inner product over the data's between-group variance; 1 at the optimum, 0 for a mapping
unrelated to the data's, negative for one against it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from token_grid import TEACHER_CONFIG, teacher_config, teacher_velocity

from sparge_jax.models.checkpoint import read_wan_config
from train.procedural import (COLOURS, DIRECTIONS, REGIONS, SHAPES, SIZE_CHANGES, context_tensor, draw_attributes,
                              render_latents, start_regions)

BATCH = 16
WORDS = {"colour": ("colour", len(COLOURS)), "shape": ("shape", len(SHAPES)),
         "size change": ("change", len(SIZE_CHANGES))}


def one_shape_training_clip(spec, index: int) -> dict:
    """`draw_attributes` of training clip `index` (seed 0) with only its first shape present and
    its caption kept (never dropped for guidance)."""
    attrs = draw_attributes(spec, 0, "train", index)
    attrs["present"] = np.arange(spec.max_shapes) < 1
    attrs["dropped"] = False
    return attrs


def clip_latents(attrs: list[dict], spec) -> np.ndarray:
    """The clips of `attrs` as the model sees them, flattened: float64 `(len(attrs), frames *
    height/s * width/s * 3 s^2)` in the latents' layout `spec.latent_shape` (space-to-depth), the
    layout of the teacher's predictions they are compared with."""
    return np.asarray(render_latents(attrs, spec), np.float64).reshape(len(attrs), -1)


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


def aligned_share(sums: np.ndarray, counts: np.ndarray, data_sums: np.ndarray, data_counts: np.ndarray,
                  total_var: float) -> float:
    """The inner product of two groupings' group means' deviations (`sums`, `counts` and the
    data's, shaped as in `between_group_share`, halves pooled), per pixel, weighted by the data's
    group shares, as a share of `total_var`: the numerator of the slope of the first grouping's
    group means on the data's. Groups empty in either are left out (none left: 0)."""
    n, data_n = counts.sum(axis=1), data_counts.sum(axis=1)
    both = (n > 0) & (data_n > 0)
    if not both.any():
        return 0.0
    deviations = sums.sum(axis=1)[both] / n[both, None] - sums.sum(axis=(0, 1)) / n.sum()
    data_deviations = data_sums.sum(axis=1)[both] / data_n[both, None] - data_sums.sum(axis=(0, 1)) / data_n.sum()
    weights = data_n[both] / data_n[both].sum()
    inner = np.einsum("gp,gp->g", deviations, data_deviations) / sums.shape[-1]
    return float((weights * inner).sum() / total_var)


class WordGroups:
    """Per-half sums of one-shape clips' vectors `(pixels,)` grouped by each word of their
    captions (colour, shape, size change; direction and start region jointly, 8 x 9 cells),
    and their squared total (their mean comes from the colour groups: every clip is in one)."""

    def __init__(self, pixels: int):
        self.sums = {name: np.zeros((n, 2, pixels)) for name, (_, n) in WORDS.items()}
        self.counts = {name: np.zeros((n, 2)) for name, (_, n) in WORDS.items()}
        self.cells = np.zeros((len(DIRECTIONS), len(REGIONS), 2, pixels))
        self.cell_counts = np.zeros((len(DIRECTIONS), len(REGIONS), 2))
        self.total_sq = 0.0

    def add(self, attrs: dict, spec, half: int, vector: np.ndarray) -> None:
        """Adds one clip's `vector` float64 `(pixels,)` to its words' groups in `half` (0 or 1)."""
        for name, (key, _) in WORDS.items():
            self.sums[name][attrs[key][0], half] += vector
            self.counts[name][attrs[key][0], half] += 1
        cell = (attrs["direction"][0], start_regions(attrs, spec)[0], half)
        self.cells[cell] += vector
        self.cell_counts[cell] += 1
        self.total_sq += float(vector @ vector)

    def mean(self) -> np.ndarray:
        """The vectors' mean `(pixels,)`."""
        return self.sums["colour"].sum(axis=(0, 1)) / self.counts["colour"].sum()

    def variance(self) -> float:
        """The vectors' variance per pixel."""
        mean = self.mean()
        return self.total_sq / (self.counts["colour"].sum() * len(mean)) - float(mean @ mean) / len(mean)

    def half_means(self) -> np.ndarray:
        """The mean vector of each half `(2, pixels)`."""
        return self.sums["colour"].sum(axis=0) / self.counts["colour"].sum(axis=0)[:, None]

    def groupings(self) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Per word, its groupings as (sums `(groups, 2, pixels)`, counts `(groups, 2)`): one for
        each value of the word it is conditioned on ("direction | start region": one a start
        region), or the one alone."""
        out = {name: [(self.sums[name], self.counts[name])] for name in WORDS}
        out["direction"] = [(self.cells.sum(axis=1), self.cell_counts.sum(axis=1))]
        out["start region"] = [(self.cells.sum(axis=0), self.cell_counts.sum(axis=0))]
        for name, axis in (("direction | start region", 1), ("start region | direction", 0)):
            out[name] = list(zip(np.moveaxis(self.cells, axis, 0), np.moveaxis(self.cell_counts, axis, 0)))
        return out

    def shares(self, total_var: float) -> dict[str, float]:
        """Each word's `between_group_share` of `total_var` (conditioned ones: averaged over the
        other word's values, weighted by their clips)."""
        out = {}
        for name, parts in self.groupings().items():
            weights = np.array([counts.sum() for _, counts in parts])
            out[name] = float(sum(w * between_group_share(s, c, total_var) for w, (s, c) in zip(weights, parts))
                              / weights.sum())
        return out

    def aligned(self, data: "WordGroups", total_var: float) -> dict[str, float]:
        """Each word's `aligned_share` of these vectors' groups with `data`'s (conditioned ones:
        averaged over the other word's values, weighted by the data's clips)."""
        out = {}
        for (name, parts), data_parts in zip(self.groupings().items(), data.groupings().values()):
            weights = np.array([counts.sum() for _, counts in data_parts])
            out[name] = float(sum(w * aligned_share(s, c, ds, dc, total_var)
                                  for w, (s, c), (ds, dc) in zip(weights, parts, data_parts)) / weights.sum())
        return out


def position_dependence(data: WordGroups, teacher: WordGroups, latent_shape, patch, total_var: float
                        ) -> tuple[float, float]:
    """(the part of the data's mean clip that depends on the token's position, as a share of
    `total_var`; the least-squares slope of the same part of the teacher's mean prediction on it:
    1 where it reproduces it, 0 where it is flat). That part of a vector of `latent_shape`
    `(frames, height, width, channels)` is its deviation from the mean over tokens (`patch`:
    the model's `(frames, height, width)` patch) of each channel at each place inside a token;
    the share and the slope's denominator are split-half inner products, unbiased by the
    clips' noise."""
    f, h, w, c = latent_shape
    pf, ph, pw = patch

    def by_position(v: np.ndarray) -> np.ndarray:
        v = v.reshape(-1, f // pf, pf, h // ph, ph, w // pw, pw, c)
        return (v - v.mean(axis=(1, 3, 5), keepdims=True)).reshape(len(v), -1)

    halves = by_position(data.half_means())
    signal = float(halves[0] @ halves[1])
    predicted = by_position(teacher.mean())[0]
    return signal / halves.shape[1] / total_var, float(predicted @ halves.mean(axis=0)) / signal


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=3000)
    p.add_argument("--config", type=Path, default=TEACHER_CONFIG,
                   help="training config: the data, and the architecture and captions of --weights")
    p.add_argument("--weights", type=Path, default=None, help="a teacher trained on --config (converted-model dir)")
    p.add_argument("--teacher-clips", type=int, default=288, help="clips whose captions the teacher predicts")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. smaller clips)")
    args = p.parse_args(argv)
    if args.clips < 4:
        p.error(f"--clips must be at least 4; got {args.clips}")
    if args.weights is not None:
        if not (args.weights / "config.json").is_file():
            p.error(f"--weights: no teacher (config.json) in {args.weights}")
        if not 4 <= args.teacher_clips <= args.clips:
            p.error(f"--teacher-clips must be from 4 to --clips ({args.clips}); got {args.teacher_clips}")
    weights = [f"model.weights={args.weights}"] if args.weights is not None else []
    cfg, spec = teacher_config([*weights, *args.overrides], args.config)
    pixels = int(np.prod(spec.latent_shape))
    data = WordGroups(pixels)
    teacher = WordGroups(pixels) if args.weights is not None else None
    velocity, params = teacher_velocity(cfg.model) if teacher is not None else (None, None)
    for first in range(0, args.clips, BATCH):
        attrs = [one_shape_training_clip(spec, i) for i in range(first, min(first + BATCH, args.clips))]
        clips = clip_latents(attrs, spec)
        for i, a in enumerate(attrs):
            data.add(a, spec, (first + i) % 2, clips[i])
        if teacher is not None and first < args.teacher_clips:
            attrs = attrs[:args.teacher_clips - first]
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), first),
                                      (len(attrs), *spec.latent_shape), jnp.float32)
            context = jnp.asarray(np.stack([context_tensor(a, spec) for a in attrs]))
            v = velocity(params, noise, jnp.full((len(attrs),), 1000.0), context)
            predicted = np.asarray(noise - v, np.float64).reshape(len(attrs), pixels)
            for i, a in enumerate(attrs):
                teacher.add(a, spec, (first + i) % 2, predicted[i])
    total_var = data.variance()
    shares = data.shares(total_var)
    print(f"{args.clips} one-shape clips of {spec.frames} x {spec.height} x {spec.width}: share of the clips' "
          f"variance (per pixel {total_var:.4f}) that each word's value decides, the loss it can remove at pure noise\n")
    if teacher is None:
        print("| word | share of variance |")
        print("|---|---|")
        for name, share in shares.items():
            print(f"| {name} | {share:.5f} |")
        return shares
    learned, aligned = teacher.shares(total_var), teacher.aligned(data, total_var)
    print(f"teacher {args.weights}: the same groupings of its pure-noise predictions for the first "
          f"{args.teacher_clips} captions (their variance per pixel {teacher.variance():.4f}), as shares of the "
          "clips' variance\n")
    patch = read_wan_config(str(args.weights)).patch_size
    position, slope = position_dependence(data, teacher, spec.latent_shape, patch, total_var)
    print(f"The data's mean clip varies with the token's position by {position:.5f} of the clips' variance; the "
          f"teacher's mean prediction reproduces {slope:.2f} of that variation (least-squares slope; 0: flat).\n")
    print("| word | data | teacher | teacher / data | aligned: slope on the data's means |")
    print("|---|---|---|---|---|")
    for name, share in shares.items():
        ratios = [f"{value / share:.2f}" if share > 0 else "n/a"  # too few clips for a positive estimate
                  for value in (learned[name], aligned[name])]
        print(f"| {name} | {share:.5f} | {learned[name]:.5f} | {ratios[0]} | {ratios[1]} |")
    return {"data": shares, "teacher": learned, "aligned": aligned,
            "position": {"data": position, "teacher slope": slope}}


if __name__ == "__main__":
    main()
