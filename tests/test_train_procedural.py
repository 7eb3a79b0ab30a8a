"""Procedural clips: determinism, layout (space-to-depth against a NumPy oracle), captions,
the unconditional context, and that the picture holds what the caption says."""

import jax
import numpy as np
import pytest

from train.procedural import (
    COLOURS,
    ClipSpec,
    ProceduralClips,
    caption_tokens,
    context_tensor,
    depth_to_space,
    draw_attributes,
    render,
    space_to_depth,
)

SPEC = ClipSpec(frames=4, height=32, width=48, space_to_depth=4, max_shapes=3, text_dim=16, cfg_dropout=0.0)


def test_examples_are_deterministic_and_distinct():
    a = ProceduralClips(SPEC, 10, seed=3).read(np.array([1, 2]))
    b = ProceduralClips(SPEC, 10, seed=3).read(np.array([2, 1]))
    np.testing.assert_array_equal(a["latents"][0], b["latents"][1])
    np.testing.assert_array_equal(a["context"][1], b["context"][0])
    assert a["latents"].shape == (2, 4, 8, 12, 48) and a["context"].shape == (2, SPEC.text_len, 16)
    assert not np.allclose(a["latents"][0], a["latents"][1])
    held = ProceduralClips(SPEC, 10, seed=3, split="heldout").read(np.array([1]))
    assert not np.allclose(held["latents"][0], a["latents"][0])
    assert -1.0 <= a["latents"].min() and a["latents"].max() <= 1.0


def test_space_to_depth_matches_numpy_oracle(rng):
    video = rng.standard_normal((2, 3, 8, 12, 3)).astype(np.float32)
    out = np.asarray(space_to_depth(video, 4))
    for f, y, x in [(0, 0, 0), (1, 1, 2), (2, 1, 1)]:
        patch = video[:, f, 4 * y: 4 * y + 4, 4 * x: 4 * x + 4, :]  # (batch, row, col, channel)
        np.testing.assert_array_equal(out[:, f, y, x], patch.reshape(2, -1))
    np.testing.assert_array_equal(depth_to_space(out, 4), video)


def test_caption_context_and_dropout():
    attrs = draw_attributes(SPEC, 0, "train", 5)
    tokens = caption_tokens(attrs, SPEC)
    n = int(attrs["present"].sum())
    assert len(tokens) == 4 * SPEC.max_shapes + 1
    assert np.all(tokens[4 * n: 4 * SPEC.max_shapes] == 0) and np.all(tokens[: 4 * n] > 0)
    ctx = context_tensor(attrs, SPEC)
    assert ctx.shape == (SPEC.text_len, 16) and np.abs(ctx).sum() > 0
    dropping = ClipSpec(**{**SPEC.__dict__, "cfg_dropout": 0.5})
    dropped = [draw_attributes(dropping, 0, "train", i)["dropped"] for i in range(200)]
    assert 0.35 < np.mean(dropped) < 0.65
    assert not any(draw_attributes(dropping, 0, "heldout", i)["dropped"] for i in range(200)), \
        "held-out clips keep their captions"
    kept = draw_attributes(dropping, 0, "heldout", int(np.flatnonzero(dropped)[0]))
    same = draw_attributes(SPEC, 0, "heldout", int(np.flatnonzero(dropped)[0]))
    assert all(np.array_equal(kept[k], same[k]) for k in kept), "the dropout rate changes no other attribute"
    zero = ProceduralClips(dropping, 200).read(np.flatnonzero(dropped)[:3])["context"]
    np.testing.assert_array_equal(zero, 0.0)


def test_shape_is_drawn_in_its_colour_where_the_caption_puts_it():
    attrs = draw_attributes(SPEC, 0, "train", 7)
    attrs.update(present=np.array([True, False, False]), radius=np.array([8.0, 8.0, 8.0]),
                 velocity=np.zeros((3, 2)), growth=np.zeros(3), shape=np.zeros(3, int),
                 position=np.array([[20.0, 16.0]] * 3))
    stacked = {k: np.asarray(v)[None] for k, v in attrs.items() if k != "dropped"}
    video = np.asarray(render(stacked, frames=2, height=32, width=48))[0]
    colour = np.array(list(COLOURS.values()))[attrs["colour"][0]] * 2 - 1
    np.testing.assert_allclose(video[:, 16, 20], np.broadcast_to(colour, (2, 3)), atol=1e-5)  # centre
    assert np.abs(video[:, 16, 40] - colour).max() > 0.05  # far outside the circle: background
    inside = np.sqrt((np.arange(48)[None] + 0.5 - 20) ** 2 + (np.arange(32)[:, None] + 0.5 - 16) ** 2) < 7.5
    np.testing.assert_allclose(video[0][inside], np.broadcast_to(colour, (inside.sum(), 3)), atol=1e-5)


def test_motion_scale_multiplies_every_speed_and_nothing_else():
    """A shifted data set (`motion_scale`): the same clips with every speed scaled, through the
    trainer's config as well; the default draws what it drew before the knob existed."""
    from train.config import load_config
    from train.procedural import clip_spec

    fast = ClipSpec(**{**SPEC.__dict__, "motion_scale": 2.5})
    for index in range(5):
        base, shifted = draw_attributes(SPEC, 3, "train", index), draw_attributes(fast, 3, "train", index)
        np.testing.assert_allclose(shifted["velocity"], 2.5 * base["velocity"], rtol=1e-12)
        np.testing.assert_allclose(shifted["pan_velocity"], 2.5 * base["pan_velocity"], rtol=1e-12)
        assert np.abs(base["velocity"]).max() > 1.0  # 1.5-4 pixels per frame, in some direction
        assert all(np.array_equal(base[k], shifted[k]) for k in base if k not in ("velocity", "pan_velocity"))
    # rendered: the same first frame (positions and background as drawn), other later frames
    slow_clips, fast_clips = (ProceduralClips(spec, 10, seed=3).read(np.arange(4))["latents"] for spec in (SPEC, fast))
    np.testing.assert_allclose(fast_clips[:, 0], slow_clips[:, 0], atol=1e-6)
    assert np.abs(fast_clips[:, 1:] - slow_clips[:, 1:]).mean() > 0.05
    cfg = load_config(None, ["data.source=procedural", "data.procedural.motion_scale=2.5"])
    assert clip_spec(cfg.data.procedural, 16, 48).motion_scale == 2.5
    with pytest.raises(ValueError, match=r"config data.procedural.motion_scale=0: must be > 0"):
        load_config(None, ["data.procedural.motion_scale=0"])


def test_size_scale_multiplies_every_radius_and_nothing_else():
    """Larger shapes (`size_scale`): every radius scaled, every other attribute as drawn at 1 (the
    renderer draws the radius it is given: test_shape_is_drawn_in_its_colour_where_the_caption_puts_it);
    through the trainer's config as well."""
    from train.config import load_config
    from train.procedural import clip_spec

    large = ClipSpec(**{**SPEC.__dict__, "size_scale": 1.5})
    for index in range(5):
        base, scaled = draw_attributes(SPEC, 3, "train", index), draw_attributes(large, 3, "train", index)
        np.testing.assert_allclose(scaled["radius"], 1.5 * base["radius"], rtol=1e-12)
        assert all(np.array_equal(base[k], scaled[k]) for k in base if k != "radius")
    cfg = load_config(None, ["data.source=procedural", "data.procedural.size_scale=1.5"])
    assert clip_spec(cfg.data.procedural, 16, 48).size_scale == 1.5
    with pytest.raises(ValueError, match=r"config data.procedural.size_scale=0: must be > 0"):
        load_config(None, ["data.procedural.size_scale=0"])


def test_shape_kind_makes_every_shape_that_kind_and_nothing_else():
    """`shape_kind`: every slot's shape is that kind, every other attribute as drawn with all four
    kinds; the caption names it; through the trainer's config as well, which refuses other names."""
    from train.config import load_config
    from train.procedural import SHAPES, caption, clip_spec

    squares = ClipSpec(**{**SPEC.__dict__, "shape_kind": "square"})
    kinds = set()
    for index in range(8):
        base, only = draw_attributes(SPEC, 3, "train", index), draw_attributes(squares, 3, "train", index)
        kinds |= set(base["shape"][base["present"]].tolist())
        np.testing.assert_array_equal(only["shape"], np.full(SPEC.max_shapes, SHAPES.index("square")))
        assert all(np.array_equal(base[k], only[k]) for k in base if k != "shape")
        assert caption(only, squares).count("square") == int(only["present"].sum())
    assert len(kinds) > 1  # the draws compared did hold other kinds
    cfg = load_config(None, ["data.source=procedural", "data.procedural.shape_kind=triangle"])
    assert clip_spec(cfg.data.procedural, 16, 48).shape_kind == "triangle"
    with pytest.raises(ValueError, match=r"config data.procedural.shape_kind='star': must be 'circle' or"):
        load_config(None, ["data.procedural.shape_kind=star"])


def test_start_region_words_name_where_the_rendered_shape_starts():
    """`start_region`: a fifth word a shape, the 3 x 3 cell of the start-position range (15-85 % of
    the frame) that holds the centroid of the shape's colour in the rendered first frame; the
    other words and their embeddings stay those of the captions without it (the shipped teacher's)."""
    from train.config import load_config
    from train.procedural import REGIONS, VOCAB, caption, clip_spec, word_embeddings

    regional = ClipSpec(**{**SPEC.__dict__, "start_region": True, "height": 96, "width": 96})
    plain = ClipSpec(**{**regional.__dict__, "start_region": False})
    assert regional.text_len == plain.text_len == 16
    colours = np.array(list(COLOURS.values())) * 2 - 1
    seen = set()
    for index in range(12):
        attrs = draw_attributes(regional, 0, "train", index)
        attrs.update(present=np.array([True, False, False]), radius=np.full(3, 6.0), growth=np.zeros(3))
        tokens = caption_tokens(attrs, regional)
        assert len(tokens) == 5 * 3 + 1 and np.all(tokens[5:15] == 0)
        without = caption_tokens(attrs, plain)
        np.testing.assert_array_equal(np.delete(tokens, [2, 7, 12]), np.concatenate([without[:4], [0] * 8, without[-1:]]))
        frame = np.asarray(render({k: np.asarray(v)[None] for k, v in attrs.items() if k != "dropped"},
                                  frames=1, height=96, width=96))[0, 0]
        ys, xs = np.nonzero(np.abs(frame - colours[attrs["colour"][0]]).max(-1) < 1e-4)
        column, row = (min(int((c / 96 - 0.15) / 0.7 * 3), 2) for c in (xs.mean() + 0.5, ys.mean() + 0.5))
        assert VOCAB[tokens[2]] == REGIONS[3 * row + column]
        assert f"starting {REGIONS[3 * row + column]} moving" in caption(attrs, regional)
        seen.add(3 * row + column)
    assert len(seen) >= 5, "the draws cover several regions"
    # the words without regions and the slots: the draw from before region words existed
    gen = np.random.default_rng(20261201)
    words, slots = word_embeddings(16, 16)
    np.testing.assert_array_equal(words[: len(VOCAB) - len(REGIONS)], gen.standard_normal((len(VOCAB) - len(REGIONS), 16)).astype(np.float32))
    np.testing.assert_array_equal(slots, 0.5 * gen.standard_normal((16, 16)).astype(np.float32))
    assert np.abs(words[-len(REGIONS):]).min() > 0 and not np.allclose(words[-1], words[-2])
    cfg = load_config(None, ["data.source=procedural", "data.procedural.start_region=true"])
    assert clip_spec(cfg.data.procedural, 16, 48).start_region is True


@pytest.mark.parametrize("field,value", [("height", 30), ("cfg_dropout", 1.0), ("frames", 0), ("motion_scale", 0.0),
                                         ("size_scale", -1.0), ("shape_kind", "star"),
                                         ("start_region", 1)])
def test_bad_spec_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ClipSpec(**{**SPEC.__dict__, field: value})


def test_rendering_on_the_accelerator_gives_the_host_clips():
    """`render_on="accelerator"` renders on the default device (the GPU where there is one) and
    leaves the latents there: the same clips as on the host, to float32 round-off of the two
    compilers."""
    from train.config import load_config

    host = ProceduralClips(SPEC, 10, seed=3).read(np.array([4, 7]))
    device = ProceduralClips(SPEC, 10, seed=3, render_on="accelerator").read(np.array([4, 7]))
    assert isinstance(host["latents"], np.ndarray) and host["latents"].dtype == np.float32
    assert isinstance(device["latents"], jax.Array) and device["latents"].dtype == np.float32
    assert device["latents"].devices() == {jax.local_devices()[0]}
    np.testing.assert_allclose(device["latents"], host["latents"], atol=1e-5)
    np.testing.assert_array_equal(device["context"], host["context"])
    with pytest.raises(ValueError, match="render_on must be 'host' or 'accelerator'; got 'gpu'"):
        ProceduralClips(SPEC, 10, render_on="gpu")
    with pytest.raises(ValueError, match="config data.procedural.render_on='gpu': must be 'host' or 'accelerator'"):
        load_config(None, ["data.procedural.render_on=gpu"])
