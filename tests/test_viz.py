"""Pictures (matplotlib figures read back from their PNG bytes) and the pictures tool."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sparge_jax.masks import AttentionPlan
from sparge_jax.tools.pictures import main as pictures_main
from sparge_jax.tools.pictures import original_order_mask
from sparge_jax.tools.viz import DPI, MASK_COLOURS, heat_grid, line_chart, mask_codes, mask_grid, save_png
from train.report import save_strip


def read_png(path) -> np.ndarray:
    """uint8 `(height, width, 3)` RGB of a PNG file (decoded by Pillow)."""
    return np.asarray(Image.open(path).convert("RGB"))


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def pixel_of(ax, x: float, y: float, height: int) -> tuple[int, int]:
    """(row, column) in the saved image of data point (x, y) of `ax` (display y runs upwards)."""
    px, py = ax.transData.transform((x, y))
    return height - 1 - int(py), int(px)


def test_mask_grid_draws_each_block_in_its_state_colour(rng, tmp_path):
    masks = [[mask_codes(rng.random((5, 9)) < 0.3, rng.random((5, 9)) < 0.3 if r else None) for _ in range(2)]
             for r in range(2)]
    fig = mask_grid(masks, ["L0 SVG", "L1 SLA"], ["head 0", "head 1"], title="masks")
    save_png(fig, tmp_path / "m.png")
    img = read_png(tmp_path / "m.png")
    width, height = fig.canvas.get_width_height()  # whole pixels of the figure's size in inches at DPI
    assert img.shape == (height, width, 3) and np.allclose(fig.get_size_inches() * DPI, (width, height), atol=1)
    colours = np.stack([rgb(c) for c in MASK_COLOURS.values()])
    axes = np.array(fig.axes).reshape(2, 2)
    for r in range(2):
        for h in range(2):
            for i in range(5):
                for j in range(9):  # cell centres: q block i down, k block j across
                    np.testing.assert_array_equal(img[pixel_of(axes[r, h], j, i, img.shape[0])],
                                                  colours[masks[r][h][i, j]], err_msg=(r, h, i, j))
    assert (masks[0][0] == 1).sum() == 0 and (masks[1][0] == 1).sum() > 0 and (masks[1][0] == 2).sum() > 0
    assert [a.get_xlabel() for a in axes[1]] == ["k block"] * 2 and axes[1, 0].get_ylabel() == "q block"
    assert [a.texts[0].get_text() for a in axes[:, 0]] == ["L0 SVG", "L1 SLA"]  # row labels
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(MASK_COLOURS)


def test_mask_codes_rank_exact_over_linear_over_skipped():
    mask, linear = np.array([[True, False, False]]), np.array([[True, True, False]])
    np.testing.assert_array_equal(mask_codes(mask, linear), [[2, 1, 0]])
    np.testing.assert_array_equal(mask_codes(mask), [[2, 0, 0]])


def test_heat_grid_colours_relative_values_on_a_log_scale(tmp_path):
    # viridis at 0, 1/2 and 1 (matplotlib's _cm_listed data): relative values 1e-4 (or less), 1e-2, 1
    low, mid, top = rgb("#440154"), rgb("#21918c"), rgb("#fde725")
    m = np.array([[1e-9, 3e-4], [0.03, 3.0]])  # max 3: relative 3e-10, 1e-4, 1e-2, 1
    fig = heat_grid([[m, 10 * m]], ["L0"], ["head 0", "head 1"], title="pooled", label="relative (log)")
    save_png(fig, tmp_path / "p.png")
    img = read_png(tmp_path / "p.png")
    for ax in fig.axes[:2]:
        for (i, j), want in {(0, 0): low, (0, 1): low, (1, 0): mid, (1, 1): top}.items():
            got = img[pixel_of(ax, j, i, img.shape[0])].astype(int)
            assert np.abs(got - want).max() <= 2, (i, j, got, want)
    bar = fig.axes[2]
    assert bar.get_yscale() == "log" and bar.get_ylim() == pytest.approx((1e-4, 1.0))
    assert bar.get_ylabel() == "relative (log)"


def test_line_chart_puts_markers_at_data_positions(tmp_path):
    fig = line_chart({"a": ([0.1, 0.5, 0.9], [0.2, 1.0, 1.8]), "b": ([0.3], [0.5])}, x_label="sparsity",
                     y_label="error", title="t", y_range=(0.0, 2.0))
    save_png(fig, tmp_path / "c.png")
    img = read_png(tmp_path / "c.png")
    assert img.shape == (420, 640, 3)
    ax = fig.axes[0]
    for x, y in [(0.1, 0.2), (0.5, 1.0), (0.9, 1.8)]:
        np.testing.assert_array_equal(img[pixel_of(ax, x, y, 420)], rgb("#1f77b4"))  # first colour of the cycle
    np.testing.assert_array_equal(img[pixel_of(ax, 0.3, 0.5, 420)], rgb("#ff7f0e"))
    assert (ax.get_xlabel(), ax.get_ylabel(), fig.get_suptitle()) == ("sparsity", "error", "t")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


TITLE = "a title much longer than the small panels below it, which must still fit inside the picture"
FIGURES = {
    "masks": lambda: mask_grid([[np.zeros((3, 4), np.int8)] * 2] * 3, ["L0 SpargeAttention2\n89% skipped"] * 3,
                               ["head 0", "head 1"], title=TITLE),
    "heat": lambda: heat_grid([[np.ones((3, 4))]], ["L0"], ["head 0"], title=TITLE, label="relative to the max"),
    "chart": lambda: line_chart({"SpargeAttention2 (a long name)": ([0.1], [0.2])}, x_label="x", y_label="y",
                                title=TITLE),
}


@pytest.mark.parametrize("name", FIGURES)
def test_titles_labels_and_legends_fit_inside_the_figure(name):
    fig = FIGURES[name]()
    fig.draw_without_rendering()
    drawn = fig.get_tightbbox()  # inches, around everything drawn: titles, tick labels, legends, colour bar
    width, height = fig.get_size_inches()
    assert fig.get_suptitle() == TITLE and drawn.height > 1
    assert -0.01 <= drawn.x0 and drawn.x1 <= width + 0.01 and -0.01 <= drawn.y0 and drawn.y1 <= height + 0.01, \
        (drawn, width, height)


def test_same_figure_same_png_bytes_without_version_stamp(rng, tmp_path):
    masks = [[mask_codes(rng.random((4, 6)) < 0.5)]]
    for n in range(2):
        save_png(mask_grid(masks, ["L0"], ["head 0"], title="t"), tmp_path / f"{n}.png")
    data = (tmp_path / "0.png").read_bytes()
    assert data == (tmp_path / "1.png").read_bytes()
    assert b"Software" not in data and b"atplotlib" not in data


def test_pictures_without_matplotlib_is_one_line_and_exit_2(tmp_path):
    """A user without the plots extra: the pictures tool names the extra (exit 2) before doing any work, and
    the training config refuses a report picture before training."""
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib fails as if it were not installed
        "from train.config import DEMO_CONFIG, load_config\n"
        "try:\n    load_config(DEMO_CONFIG, [])\nexcept ValueError as e:\n    print('train:', e)\n"
        "from sparge_jax.tools.pictures import cli\n"
        f"cli(['--out', {str(tmp_path / 'pics')!r}])\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == ["python -m sparge_jax.tools.pictures: error: drawing pictures needs "
                                               "matplotlib, an optional extra: pip install 'sparge-jax[plots]'"]
    assert run.stdout.startswith("train: report_path needs matplotlib") and "sparge-jax[plots]" in run.stdout
    assert "report_path=null" in run.stdout
    assert not (tmp_path / "pics").exists()


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


@pytest.mark.slow
def test_pictures_tool_writes_pngs(tmp_path, capsys):
    pictures_main(["--out", str(tmp_path), "--grid", "3", "4", "6", "--heads", "2", "--head-dim", "16",
                   "--block-q", "16", "--block-k", "8", "--methods", "SpargeAttn", "Radial", "SVG"])
    for name in ("masks.png", "pooled.png", "sparsity_error.png"):
        img = read_png(tmp_path / name)
        assert img.shape[0] > 300 and img.shape[1] > 500 and len(np.unique(img.reshape(-1, 3), axis=0)) > 3
    masks = read_png(tmp_path / "masks.png").reshape(-1, 3)
    for colour in ("skipped", "computed exactly"):  # SLA is not drawn: no linear blocks
        assert (masks == rgb(MASK_COLOURS[colour])).all(-1).sum() > 1000, colour
    printed = capsys.readouterr().out.splitlines()
    assert [r for r in printed if r.startswith("wrote")] == [f"wrote {tmp_path / n}" for n in
                                                             ("masks.png", "pooled.png", "sparsity_error.png")]
    rows = [r for r in printed if r.startswith("| ") and "method" not in r]
    assert len(rows) == 15
    for r in rows:
        sparsity, error = (float(c) for c in r.strip("| ").split(" | ")[2:4])
        assert 0 <= sparsity < 1 and 0 <= error < 1


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


@pytest.mark.slow
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
    # the file stores its grid: no --grid needed to draw it again, and the same pictures come out
    np.testing.assert_array_equal(np.load(tmp_path / "qkv.npz")["grid"], [3, 4, 6])
    pictures_main(["--out", str(tmp_path / "again"), "--qkv", str(tmp_path / "qkv.npz"), "--block-q", "16",
                   "--block-k", "8", "--methods", "SpargeAttn", "Radial", "--no-progress"])
    for name in ("masks.png", "pooled.png", "sparsity_error.png"):  # same inputs, same bytes (whole tool)
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "pics" / name).read_bytes(), name
    assert [r for r in capsys.readouterr().out.splitlines() if r.startswith("|")] == \
        [r for r in printed if r.startswith("|")]


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


def test_frame_strip_numbers_the_frames_of_the_whole_clip(rng, tmp_path):
    clip = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    assert list(save_strip(tmp_path / "a.png", {"clip": clip})) == [0, 5, 10, 15]
    # a strip stored as 4 evenly spaced frames of a 16-frame clip (benchmarks/quality.py's frames.npz)
    stored = clip[[0, 5, 10, 15]]
    assert list(save_strip(tmp_path / "b.png", {"clip": stored}, of_frames=16)) == [0, 5, 10, 15]
    assert list(save_strip(tmp_path / "c.png", {"clip": stored}, frames=2, of_frames=16)) == [0, 15]
    assert list(save_strip(tmp_path / "d.png", {"clip": stored})) == [0, 1, 2, 3]
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))
