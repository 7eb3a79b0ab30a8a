"""benchmarks/caption_information.py: the split-half estimate of a grouping's between-group
variance against the known value of Gaussian groups (oracle: the means they were drawn around),
the word groupings of a start-region-dependent vector and the position slope of a half-learned
layout against their values computed directly, and the script on small clips, with a teacher."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from train.config import load_config  # noqa: E402
from train.procedural import ProceduralClips, REGIONS, clip_spec, draw_attributes, start_regions  # noqa: E402
from caption_information import (WordGroups, between_group_share, clip_latents, main,  # noqa: E402
                                 position_dependence)


def test_between_group_share_is_unbiased_for_gaussian_groups():
    gen = np.random.default_rng(0)
    pixels, per_half, sigma = 400, 30, 2.0
    centres = gen.standard_normal((3, pixels)) * np.array([[0.2], [0.5], [1.0]])
    share = np.array([0.2, 0.3, 0.5])
    counts = np.round(share[:, None] * np.array([[2 * per_half, 2 * per_half]])).astype(int)
    sums = np.stack([[(centres[g] + sigma * gen.standard_normal((counts[g, h], pixels))).sum(axis=0)
                      for h in range(2)] for g in range(3)])
    overall = (share[:, None] * centres).sum(axis=0)
    between = float((share * ((centres - overall) ** 2).mean(axis=1)).sum())
    estimate = between_group_share(sums, counts.astype(float), total_var=1.0)
    assert abs(estimate - between) < 0.1 * between, (estimate, between)
    # the plug-in estimate (one half's means, squared) is biased upwards by the noise: sigma^2 / n
    naive = float((share * ((sums[:, 0] / counts[:, :1] - sums[:, 0].sum(0) / counts[:, 0].sum()) ** 2).mean(1)).sum())
    assert naive - between > 0.05
    # a group with no clip in one half is left out
    counts[2, 1] = 0
    assert np.isfinite(between_group_share(sums, counts.astype(float), 1.0))


def test_script_runs_on_small_clips(capsys):
    shares = main(["--clips", "48", "data.procedural.height=64", "data.procedural.width=64", "data.procedural.frames=4"])
    assert set(shares) == {"colour", "shape", "size change", "direction", "start region", "direction | start region",
                           "start region | direction"}
    assert shares["colour"] > 0.0 and all(np.isfinite(v) for v in shares.values())
    assert "| direction | start region |" in capsys.readouterr().out


def _region_spec():
    """The clip spec of the wide start-region teacher's data."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "teacher_wide_regions.json", [])
    return clip_spec(cfg.data.procedural, 8, 3 * cfg.data.procedural.space_to_depth ** 2)


def test_word_groups_give_a_region_dependent_vector_its_between_variance():
    """Vectors that depend on the start region alone (each region's own constant, the role a
    teacher's pure-noise prediction plays when it has learned that word and nothing else): the
    start region's share is their between-region variance (oracle: computed from the regions'
    proportions), the other words' shares are near 0."""
    spec = _region_spec()
    gen = np.random.default_rng(1)
    pixels = 200
    constants = gen.standard_normal((len(REGIONS), pixels))
    groups = WordGroups(pixels)
    regions = []
    for i in range(600):
        a = draw_attributes(spec, 0, "train", i)
        regions.append(start_regions(a, spec)[0])
        groups.add(a, spec, i % 2, constants[regions[-1]])
    p = np.bincount(regions, minlength=len(REGIONS)) / len(regions)
    centre = p @ constants
    between = float((p * ((constants - centre) ** 2).mean(axis=1)).sum())
    shares = groups.shares(total_var=1.0)
    assert abs(shares["start region"] - between) < 0.05 * between, (shares["start region"], between)
    assert abs(shares["start region | direction"] - between) < 0.1 * between
    for word in ("colour", "shape", "size change", "direction"):
        assert abs(shares[word]) < 0.1 * between, (word, shares[word], between)
    assert abs(groups.variance() - between) < 0.05 * between  # the vectors vary only between regions


def test_aligned_share_tells_the_data_mapping_from_a_reversed_one():
    """Data vectors: each start region's constant plus noise. A teacher predicting half the
    constant, or its negative, or the constants of a shuffled mapping (each with its own noise):
    the plain ratio of between-group shares is 0.25, 1 and 1; the aligned ratio (the slope of the
    teacher's region means on the data's) is 0.5, -1 and the slope of the shuffled constants on
    the true ones (oracle: computed from the regions' proportions)."""
    spec = _region_spec()
    gen = np.random.default_rng(3)
    pixels = 300
    constants = gen.standard_normal((len(REGIONS), pixels))
    shuffled = constants[gen.permutation(len(REGIONS))]
    groups = {name: WordGroups(pixels) for name in ("data", "half", "negative", "shuffled")}
    regions = []
    for i in range(900):
        a = draw_attributes(spec, 0, "train", i)
        r = start_regions(a, spec)[0]
        regions.append(r)
        for name, vector in (("data", constants[r]), ("half", 0.5 * constants[r]), ("negative", -constants[r]),
                             ("shuffled", shuffled[r])):
            groups[name].add(a, spec, i % 2, vector + 0.5 * gen.standard_normal(pixels))
    p = np.bincount(regions, minlength=len(REGIONS)) / len(regions)
    deviations = constants - p @ constants
    between = float((p * (deviations ** 2).mean(axis=1)).sum())
    shuffled_slope = float((p * ((shuffled - p @ shuffled) * deviations).mean(axis=1)).sum()) / between
    share = groups["data"].shares(1.0)["start region"]
    for name, plain, slope in (("half", 0.25, 0.5), ("negative", 1.0, -1.0), ("shuffled", None, shuffled_slope)):
        ratio = groups[name].shares(1.0)["start region"] / share
        aligned = groups[name].aligned(groups["data"], 1.0)["start region"] / share
        assert abs(aligned - slope) < 0.08, (name, aligned, slope)
        if plain is not None:
            assert abs(ratio - plain) < 0.1 * plain, (name, ratio)
    assert abs(shuffled_slope) < 0.6  # the shuffled mapping's own between share is near the data's, its slope is not


def test_script_scores_a_teacher_on_small_clips(capsys):
    out = main(["--clips", "32", "--weights", str(Path(__file__).resolve().parents[1] / "train" / "teacher"),
                "--teacher-clips", "8", "data.procedural.height=64", "data.procedural.width=64",
                "data.procedural.frames=4"])
    assert set(out) == {"data", "teacher", "aligned", "position"}
    assert set(out["teacher"]) == set(out["aligned"]) == set(out["data"])
    assert np.isfinite(out["position"]["teacher slope"]) and out["position"]["data"] > 0
    assert all(np.isfinite(v) for v in [*out["teacher"].values(), *out["aligned"].values()])
    assert "| word | data | teacher | teacher / data | aligned: slope on the data's means |" in capsys.readouterr().out


def test_clip_vectors_are_in_the_layout_of_the_models_latents():
    """The data's vectors are compared, pixel for pixel, with the teacher's predictions, which are
    latents: they must be the training latents (`ProceduralClips.read`, the oracle of what the
    model sees), flattened, not the rendered pixels (until 2026-12-03 they were, and the aligned
    ratio and the position slope compared mismatched places)."""
    spec = _region_spec()
    clips = ProceduralClips(spec, 8, seed=3)
    indices = np.arange(5)
    latents = np.asarray(clips.read(indices)["latents"], np.float64).reshape(5, -1)
    np.testing.assert_allclose(clip_latents(clips.attributes(indices), spec), latents, rtol=0, atol=1e-6)


def test_position_dependence_reads_the_slope_of_a_half_learned_layout():
    """Data vectors: a position-dependent layout S (zero mean over tokens) plus a constant per
    channel and place inside a token plus noise; teacher vectors: 0.5 S plus another such
    constant plus noise. Oracle: the share is mean(S^2) / total_var, the slope 0.5."""
    spec, shape, patch = _region_spec(), (2, 4, 6, 3), (1, 2, 2)
    gen = np.random.default_rng(2)
    layout = gen.standard_normal((2, 2, 2, 3, 2, 3))  # (frames, rows, ., columns, ., channels) of tokens
    layout -= layout.mean(axis=(0, 1, 3), keepdims=True)
    layout = layout.reshape(-1)
    offsets = [np.broadcast_to(gen.standard_normal((1, 1, 2, 1, 2, 3)), (2, 2, 2, 3, 2, 3)).reshape(-1)
               for _ in range(2)]
    data, teacher = WordGroups(layout.size), WordGroups(layout.size)
    for i in range(400):
        a = draw_attributes(spec, 0, "train", i)
        data.add(a, spec, i % 2, layout + offsets[0] + 0.5 * gen.standard_normal(layout.size))
        teacher.add(a, spec, i % 2, 0.5 * layout + offsets[1] + 0.5 * gen.standard_normal(layout.size))
    share, slope = position_dependence(data, teacher, shape, patch, total_var=2.0)
    assert abs(share - float(layout @ layout) / layout.size / 2.0) < 0.02 * share, share
    assert abs(slope - 0.5) < 0.03, slope
    # a teacher with the offsets alone (flat across tokens) reads 0
    flat = WordGroups(layout.size)
    for i in range(4):
        flat.add(draw_attributes(spec, 0, "train", i), spec, i % 2, offsets[1])
    assert abs(position_dependence(data, flat, shape, patch, 2.0)[1]) < 1e-9
