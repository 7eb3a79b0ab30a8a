"""PNG writer, text, charts and the pictures tool."""

import struct
import zlib

import numpy as np
import pytest

from sparge_jax.masks import AttentionPlan
from sparge_jax.tools.pictures import main as pictures_main
from sparge_jax.tools.pictures import original_order_mask
from sparge_jax.tools.viz import _GLYPHS, colormap, draw_text, line_chart, mask_tile, text_width, tile_grid, write_png


def read_png(path):
    """Minimal independent PNG reader for 8-bit RGB/grey, filter type 0 rows, checking CRCs."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = 3 if colour == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape((h, w, channels) if channels == 3 else (h, w))


@pytest.mark.parametrize("shape", [(7, 13, 3), (5, 9)])
def test_png_round_trip(tmp_path, rng, shape):
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    write_png(tmp_path / "x.png", img)
    np.testing.assert_array_equal(read_png(tmp_path / "x.png"), img)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "y.png", img.astype(np.float32))


def test_colormap_endpoints_and_monotone_brightness():
    c = colormap(np.linspace(0, 1, 11)).astype(float)
    np.testing.assert_array_equal(c[0], [68, 1, 84])
    np.testing.assert_array_equal(c[-1], [253, 231, 37])
    assert np.all(np.diff(c @ [0.3, 0.59, 0.11]) > 0)


def test_draw_text_writes_the_glyph_bitmap():
    canvas = np.full((12, 20, 3), 255, np.uint8)
    draw_text(canvas, 1, 1, "7", color=(0, 0, 0), scale=2)
    glyph = np.array([c == "#" for c in _GLYPHS["7"].replace(" ", "")]).reshape(5, 3)
    want = np.repeat(np.repeat(glyph, 2, 0), 2, 1)
    np.testing.assert_array_equal(canvas[1:11, 1:7, 0] == 0, want)
    assert (canvas[:, 8:] == 255).all()


def test_mask_tile_and_grid_layout():
    mask = np.array([[True, False], [False, True]])
    tile = mask_tile(mask, cell=3)
    assert tile.shape == (6, 6, 3) and (tile[:3, :3] == 30).all() and (tile[:3, 3:] == 235).all()
    sheet = tile_grid([[tile, tile]], ["A"], ["X", "Y"], title="T")
    assert ((sheet == 30).all(-1)).sum() == 2 * 18


def test_line_chart_puts_markers_at_data_positions():
    img = line_chart({"a": ([0.0, 1.0], [0.0, 2.0])}, x_label="x", y_label="y", size=(400, 300),
                     y_range=(0.0, 2.0))
    left, right, top, bottom = 70, 170, 50, 50
    red = np.array([31, 119, 180])
    assert (img[300 - bottom, left] == red).all()       # (0, 0)
    assert (img[top, 400 - right] == red).all()         # (1, 2)


def test_original_order_mask_matches_brute_force(rng):
    s, bq, bk = 37, 8, 4
    mask = rng.random((1, 1, 5, 10)) < 0.3
    qo, ko = rng.permutation(s), rng.permutation(s)
    plan = AttentionPlan(mask, qo[None, None], ko[None, None])
    got = original_order_mask(plan, 0, 0, s, s, bq, bk)
    want = np.zeros((5, 10), bool)
    slot_q, slot_k = np.argsort(qo), np.argsort(ko)
    for t in range(s):
        for u in range(s):
            if mask[0, 0, slot_q[t] // bq, slot_k[u] // bk]:
                want[t // bq, u // bk] = True
    np.testing.assert_array_equal(got, want)


def test_pictures_tool_writes_pngs(tmp_path, capsys):
    pictures_main(["--out", str(tmp_path), "--grid", "3", "4", "6", "--heads", "2", "--head-dim", "16",
                   "--block-q", "16", "--block-k", "8", "--methods", "SpargeAttn", "Radial", "SVG"])
    for name in ("masks.png", "pooled.png", "sparsity_error.png"):
        img = read_png(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 50 and len(np.unique(img.reshape(-1, 3), axis=0)) > 3
    printed = capsys.readouterr().out.splitlines()
    assert [r for r in printed if r.startswith("wrote")] == [f"wrote {tmp_path / n}" for n in
                                                             ("masks.png", "pooled.png", "sparsity_error.png")]
    rows = [r for r in printed if r.startswith("| ") and "method" not in r]
    assert len(rows) == 15
    for r in rows:
        sparsity, error = (float(c) for c in r.strip("| ").split(" | ")[2:4])
        assert 0 <= sparsity < 1 and 0 <= error < 1
    # the same inputs give the same bytes (committed pictures are only rewritten when they change)
    pictures_main(["--out", str(tmp_path / "again"), "--grid", "3", "4", "6", "--heads", "2", "--head-dim", "16",
                   "--block-q", "16", "--block-k", "8", "--methods", "SpargeAttn", "Radial", "SVG", "--no-progress"])
    for name in ("masks.png", "pooled.png", "sparsity_error.png"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes(), name


@pytest.mark.matmul_precision("highest")
def test_capture_qkv_matches_a_float64_model_of_block_zero(rng, tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparge_jax.tools.capture import capture_qkv, save_qkv
    from sparge_jax.models import WAN_CONFIGS, WanModel
    from sparge_jax.models.rope import rope_angles
    from sparge_jax.models.wan import layer_norm, timestep_features

    config = WAN_CONFIGS["tiny"]
    model = WanModel(config, rngs=nnx.Rngs(2))
    latents = jnp.asarray(rng.standard_normal((1, 2, 6, 8, 16)), jnp.float32)
    t = jnp.asarray([700.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)
    captured = capture_qkv(model, latents, t, ctx, layers=[0, 1])
    assert sorted(captured) == ["L0", "L1"] and captured["L0"][0].shape == (1, 24, 4, 16)
    # block 0's self-attention input, then q/k/v, RMS norm and RoPE in float64
    tokens = np.asarray(model.patch_embedding(latents), np.float64).reshape(1, -1, config.dim)
    e0 = np.asarray(model.time_projection(jax.nn.silu(model.time_embedding(timestep_features(t, 256)))))
    e = np.asarray(model.blocks[0].modulation[...], np.float64) + e0.reshape(1, 6, config.dim)
    h = np.asarray(layer_norm(jnp.asarray(tokens), config.eps), np.float64) * (1 + e[:, 1:2]) + e[:, 0:1]
    attn = model.blocks[0].self_attn
    lin = lambda m, x: x @ np.asarray(m.kernel[...], np.float64) + np.asarray(m.bias[...], np.float64)
    rms = lambda m, x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.eps) * np.asarray(m.scale[...])
    q, k, v = rms(attn.norm_q, lin(attn.q, h)), rms(attn.norm_k, lin(attn.k, h)), lin(attn.v, h)
    angles = np.exp(1j * rope_angles((2, 3, 4), 16))[None, :, None, :]
    rot = lambda x: (x.reshape(1, 24, 4, 8, 2) @ [1, 1j] * angles).view(np.float64).reshape(1, 24, 4, 16)
    want = (rot(q.reshape(1, 24, 4, 16)), rot(k.reshape(1, 24, 4, 16)), v.reshape(1, 24, 4, 16))
    for got, ref in zip(captured["L0"], want):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
    save_qkv(tmp_path / "qkv.npz", captured)
    data = np.load(tmp_path / "qkv.npz")
    assert sorted(data.files) == ["k_L0", "k_L1", "q_L0", "q_L1", "v_L0", "v_L1"]
    np.testing.assert_array_equal(data["v_L1"], np.asarray(captured["L1"][2]))


def test_pictures_from_a_checkpoint(tmp_path, capsys):
    from flax import nnx

    from sparge_jax.models import WAN_CONFIGS, WanModel, save_wan_params

    config = WAN_CONFIGS["tiny"]
    save_wan_params(str(tmp_path / "ckpt"), nnx.to_pure_dict(nnx.state(WanModel(config, rngs=nnx.Rngs(0)))), config)
    np.save(tmp_path / "ctx.npy", np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32))
    pictures_main(["--out", str(tmp_path / "pics"), "--checkpoint", str(tmp_path / "ckpt"), "--context",
                   str(tmp_path / "ctx.npy"), "--latent-shape", "3", "8", "12", "--layers", "1",
                   "--block-q", "16", "--block-k", "8", "--methods", "SpargeAttn", "Radial",
                   "--save-qkv", str(tmp_path / "qkv.npz")])
    assert read_png(tmp_path / "pics" / "masks.png").shape[0] > 30
    assert np.load(tmp_path / "qkv.npz")["q_L1"].shape == (1, 72, 4, 16)
    printed = capsys.readouterr().out.splitlines()
    assert sum(r.startswith("| Radial") for r in printed) == 5
    assert f"wrote {tmp_path / 'qkv.npz'} (captured q/k/v, grid (3, 4, 6))" in printed
    # the file stores its grid: no --grid needed to draw it again, and the same masks come out
    np.testing.assert_array_equal(np.load(tmp_path / "qkv.npz")["grid"], [3, 4, 6])
    pictures_main(["--out", str(tmp_path / "again"), "--qkv", str(tmp_path / "qkv.npz"), "--block-q", "16",
                   "--block-k", "8", "--methods", "SpargeAttn", "Radial", "--no-progress"])
    assert (tmp_path / "again" / "masks.png").read_bytes() == (tmp_path / "pics" / "masks.png").read_bytes()
    assert [r for r in capsys.readouterr().out.splitlines() if r.startswith("|")] == \
        [r for r in printed if r.startswith("|")]


def test_tile_grid_fits_its_title():
    title = "a title longer than two small tiles"
    sheet = tile_grid([[np.zeros((4, 4, 3), np.uint8)] * 2], ["L0"], ["h0", "h1"], title=title)
    assert sheet.shape[1] >= text_width(title) + 6
    assert (sheet[6:16, 6 + text_width(title) - 8:6 + text_width(title)] < 255).any()  # its last letter is drawn


def test_pictures_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    import json

    from sparge_jax.models import WAN_CONFIGS
    from sparge_jax.tools.pictures import cli

    for name in ("tiny", "tiny-i2v"):  # config.json alone: every case stops before the weights load
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(WAN_CONFIGS[name].to_dict()))
    np.savez(tmp_path / "noq.npz", k_L0=np.ones((1, 50, 2, 8), np.float32))
    qkv = {f"{p}_L0": np.ones((1, 50, 2, 8), np.float32) for p in "qkv"}
    np.savez(tmp_path / "qkv.npz", **qkv)
    np.savez(tmp_path / "grid.npz", **qkv, grid=np.array([5, 5, 2]))
    tiny = ["--checkpoint", str(tmp_path / "tiny"), "--context", str(tmp_path / "ctx.npy")]
    cases = [
        (["--qkv", str(tmp_path / "missing.npz")], "--qkv: [Errno 2] No such file"),
        (["--qkv", str(tmp_path / "noq.npz")], "holds no q_<layer> arrays"),
        (["--qkv", str(tmp_path / "qkv.npz"), "--grid", "3", "4", "6"],
         "--grid (3, 4, 6) holds 72 tokens but the --qkv arrays have 50"),
        (["--qkv", str(tmp_path / "qkv.npz")], "stores no token grid (written before grids were stored): give --grid"),
        (["--qkv", str(tmp_path / "grid.npz"), "--grid", "2", "5", "5"], "differs from the grid (5, 5, 2) stored"),
        (["--checkpoint", str(tmp_path / "tiny")], "--checkpoint needs --context"),
        (["--checkpoint", str(tmp_path / "tiny-i2v"), "--context", "x.npy"], "holds an i2v model"),
        ([*tiny, "--latent-shape", "3", "7", "10"], "--latent-shape: latent shape (3, 7, 10) must be a multiple"),
        ([*tiny, "--latent-shape", "3", "8", "12", "--layers", "0", "5"], "--layers must be block indices in [0, 2)"),
        ([*tiny, "--latent-shape", "3", "8", "12"], "--context: [Errno 2] No such file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli(["--out", str(tmp_path / "pics"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith("python -m sparge_jax.tools.pictures: error: ") and message in err[0], (err, message)


def test_colour_scale_runs_from_the_top_of_the_colormap_to_its_bottom():
    from sparge_jax.tools.viz import beside, colour_scale

    panel = colour_scale(80, ["max", "1e-2", "1e-4"], width=10)
    np.testing.assert_array_equal(panel[5, :10], np.repeat(colormap(np.array([1.0])), 10, axis=0))
    np.testing.assert_array_equal(panel[84, :10], np.repeat(colormap(np.array([0.0])), 10, axis=0))
    assert (panel[:, 16:] < 255).any(axis=(1, 2))[[1, 41, 80]].all()  # a label at the top, middle, bottom
    sheet = beside(np.zeros((30, 20, 3), np.uint8), panel, top=4)
    assert sheet.shape == (94, 20 + 6 + panel.shape[1] + 6, 3)
    np.testing.assert_array_equal(sheet[4:94, 26:26 + panel.shape[1]], panel)
