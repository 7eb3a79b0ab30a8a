"""From videos and prompts to videos: `sparge_jax.video` (FFmpeg through imageio-ffmpeg) against
known frames, `sparge-prepare` (videos + captions -> sparge-latents-v1 shards, skipping and
listing unreadable clips, resuming) and the sampler's `--prompt` / video `--out` /
`--compare-dense`, all with tiny models whose sizes fit each other: the umT5 and VAE fixtures
(d_model 32, z_dim 4, converted from transformers' and diffusers' layouts) and a random DiT
`tiny` with 4 latent channels (text_dim = d_model = 32, in_dim = out_dim = z_dim = 4)."""

import json
import os
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from convert.__main__ import main as convert_main
from sparge_jax.tools import sample as sample_cli
from sparge_jax.models import WAN_CONFIGS, WanModel, load_text_encoder, load_wan_vae
from sparge_jax.models.checkpoint import save_wan_params
from sparge_jax.tools.text_to_video import check_fit, decode_latents
from sparge_jax.video import read_video, to_uint8, to_unit_range, video_scores, write_video
from train import prepare
from train.prepare import encode_video
from train.data import ShardedLatents

UMT5_HF = os.path.join(os.path.dirname(__file__), "fixtures", "umt5", "hf")
VAE_DIFFUSERS = os.path.join(os.path.dirname(__file__), "fixtures", "wan_vae")


def moving_pattern(frames: int, height: int, width: int, phase: float = 0.0) -> np.ndarray:
    """uint8 `(frames, height, width, 3)`: smooth colour waves that move from frame to frame and
    vary along the width (so a wrong crop or frame shows)."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    red = 128 + 100 * np.sin(2 * np.pi * (x / width * 1.5 + t / 10 + phase))
    green = 40 + 180 * y / height
    blue = 128 + 90 * np.cos(2 * np.pi * (x / width + y / height / 2 - t / 14))
    return np.stack([red, green, blue], -1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A pipeline folder as sparge-convert fills it: transformer/ (random tiny DiT, 4 latent
    channels), vae/ and text_encoder/ (the fixtures, with the umT5 tokenizer), all float32."""
    root = tmp_path_factory.mktemp("wan")
    dit = WanModel(WAN_CONFIGS["tiny"].replace(in_dim=4, out_dim=4), rngs=nnx.Rngs(1))
    save_wan_params(str(root / "transformer"), nnx.to_pure_dict(nnx.state(dit)), dit.config)
    for source, name in ((VAE_DIFFUSERS, "vae"), (UMT5_HF, "text_encoder")):
        assert convert_main([source, str(root / name), "--dtype", "fp32", "--no-progress"]) == 0
    return root


def test_write_read_resize_crop_and_fps_against_known_frames(tmp_path):
    frames = moving_pattern(12, 48, 96)
    path = write_video(tmp_path / "clip.mp4", frames, fps=16, quality=9)
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(float) - frames).mean() < 3  # H.264 at quality 9, 4:2:0 chroma
    # cover 32 x 32: scale 48 x 96 to 32 x 64 (Lanczos), keep the middle 32 columns
    got = read_video(path, frames=5, size=(32, 32)).astype(float)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((64, 32), Image.LANCZOS)) for f in frames[:5]])
    assert got.shape == (5, 32, 32, 3)
    assert np.abs(got - resized[:, :, 16:48]).mean() < 4
    assert np.abs(got - resized[:, :, :32]).mean() > 15  # a crop at the left edge is far off
    # 8 fps from 16 fps: every other frame
    halved = read_video(path, fps=8).astype(float)
    assert halved.shape[0] == 6 and np.abs(halved - frames[::2]).mean() < 3
    with pytest.raises(ValueError, match="has 12 frames; 13 needed"):
        read_video(path, frames=13)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        read_video(tmp_path / "broken.mp4")
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", frames[:, :, :95])


def run_prepare(videos, out, models, capsys, *extra):
    summary = prepare.main([str(videos), str(out), "--vae", str(models / "vae"), "--text-encoder",
                            str(models / "text_encoder"), "--frames", "5", "--height", "32", "--width", "32",
                            "--examples-per-shard", "2", "--no-progress", *extra])
    return summary, capsys.readouterr()


def test_prepare_writes_shards_skips_unreadable_clips_and_resumes(models, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    captions = {"a.mp4": "a red fox runs", "b.mkv": "waves at night", "broken.mp4": "never read",
                "c.mp4": "a slow pan over hills"}
    for number, name in enumerate(captions):
        if name == "broken.mp4":
            (videos / name).write_bytes(b"\x00" * 64)
        else:  # 40 x 72 at 16 fps: scaled to 32 x 57.6 -> 58 and centre-cropped
            write_video(videos / name, moving_pattern(7, 40, 72, phase=number / 4), fps=16)
    (videos / "metadata.jsonl").write_text("".join(json.dumps({"video": k, "caption": v}) + "\n"
                                                   for k, v in captions.items()))
    out = tmp_path / "data"
    summary, printed = run_prepare(videos, out, models, capsys)
    assert (summary["examples"], summary["shards"], summary["resumed_shards"]) == (3, 2, 0)
    assert [s["line"] for s in summary["skipped"]] == [3]
    assert "line 3: cannot read video" in printed.err and "broken.mp4" in printed.err

    data = ShardedLatents(out, validate=True)
    assert len(data) == 3 and data.shapes == {"latents": (2, 4, 4, 4), "context": (512, 32)}
    rows = data.read(np.arange(3))
    vae, text = load_wan_vae(str(models / "vae")), load_text_encoder(str(models / "text_encoder"))
    for row, name in enumerate(["a.mp4", "b.mkv", "c.mp4"]):  # rows in caption order, the broken clip left out
        clip = read_video(videos / name, frames=5, size=(32, 32))
        np.testing.assert_allclose(rows["latents"][row], np.asarray(encode_video(vae, to_unit_range(clip)[None]))[0],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rows["context"][row], np.asarray(text([captions[name]]))[0], rtol=1e-5, atol=1e-6)

    # a run stopped after the first shard: the second is redone, the first left alone
    manifest = json.loads((out / "prepare.json").read_text())
    del manifest["shards"]["1"]
    (out / "prepare.json").write_text(json.dumps(manifest))
    (out / "shard-00001.safetensors").unlink()
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    summary, printed = run_prepare(videos, out, models, capsys)
    assert (summary["examples"], summary["resumed_shards"]) == (3, 1) and len(summary["skipped"]) == 1
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    again = ShardedLatents(out).read(np.arange(3))
    np.testing.assert_array_equal(again["latents"], rows["latents"])

    # a finished shard's captions edited: refused, as are other settings
    lines = (videos / "metadata.jsonl").read_text().replace("waves at night", "waves by day")
    (videos / "metadata.jsonl").write_text(lines)
    with pytest.raises(ValueError, match="--captions changed since shard 0 was written"):
        run_prepare(videos, out, models, capsys)
    with pytest.raises(SystemExit) as stop:
        prepare.cli([str(videos), str(out), "--vae", str(models / "vae"), "--text-encoder",
                     str(models / "text_encoder"), "--frames", "9", "--height", "32", "--width", "32",
                     "--examples-per-shard", "2", "--no-progress"])
    assert stop.value.code == 2 and "other settings (frames differ" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.matmul_precision("highest")
def test_sample_prompt_to_video_with_dense_comparison(models, tmp_path, capsys):
    common = ["--steps", "2", "--guidance", "2", "--seed", "3", "--compare-dense"]
    text = load_text_encoder(str(models / "text_encoder"))
    embeddings = np.asarray(text(["a red fox", ""]))
    np.save(tmp_path / "ctx.npy", embeddings[:1])
    np.save(tmp_path / "neg.npy", embeddings[1:])
    sample_cli.main(["--checkpoint", str(models / "transformer"), "--context", str(tmp_path / "ctx.npy"),
                     "--negative-context", str(tmp_path / "neg.npy"), "--out", str(tmp_path / "lat.npy"),
                     "--latent-shape", "3", "8", "8", *common])
    capsys.readouterr()
    # the pipeline folder as --checkpoint: transformer/, vae/, text_encoder/ found inside
    summary = sample_cli.main(["--checkpoint", str(models), "--prompt", "a red fox", "--out", str(tmp_path / "v.mp4"),
                               "--num-frames", "9", "--height", "64", "--width", "64", *common])
    printed = capsys.readouterr().out
    video = read_video(tmp_path / "v.mp4")
    assert video.shape == (9, 64, 64, 3)
    assert read_video(tmp_path / "v_dense.mp4").shape == (9, 64, 64, 3)
    pair = read_video(tmp_path / "v_dense_vs_sparse.mp4")
    assert pair.shape == (9, 64, 128, 3)

    vae = load_wan_vae(str(models / "vae"))
    sparse = to_uint8(decode_latents(vae, np.load(tmp_path / "lat.npy"))[0])
    dense = to_uint8(decode_latents(vae, np.load(tmp_path / "lat_dense.npy"))[0])
    luma = np.array([0.299, 0.587, 0.114])  # H.264 keeps luma at full resolution (chroma at half)
    assert np.abs((video.astype(float) - sparse) @ luma).mean() < 4  # what was written
    assert np.abs((video.astype(float) - sparse[::-1]) @ luma).mean() > 20  # frames in order
    assert np.abs((pair[:, :, :64].astype(float) - dense) @ luma).mean() < 4
    mse = np.mean((sparse.astype(np.float64) - dense) ** 2)
    np.testing.assert_allclose(summary["video_psnr_db"], 10 * np.log10(255 ** 2 / mse), rtol=1e-6)
    np.testing.assert_allclose(summary["video_ssim"], video_scores(sparse, dense)["ssim"], rtol=1e-6)
    assert f"PSNR {summary['video_psnr_db']:.2f} dB, SSIM {summary['video_ssim']:.4f}" in printed


def test_without_the_video_extra_one_line_and_exit_2(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    (tmp_path / "metadata.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n')
    for run in (lambda: prepare.cli([str(tmp_path), str(tmp_path / "out"), "--vae", str(models / "vae"),
                                     "--text-encoder", str(models / "text_encoder")]),
                lambda: sample_cli.cli(["--checkpoint", str(models), "--prompt", "x", "--out", str(tmp_path / "v.mp4"),
                                        "--latent-shape", "1", "2", "2"])):
        with pytest.raises(SystemExit) as stop:
            run()
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().endswith("pip install 'sparge-jax[video]'")
    assert not (tmp_path / "out").exists()


def test_models_that_do_not_fit_and_missing_parts(models, tmp_path, capsys):
    tiny = WAN_CONFIGS["tiny"]
    with pytest.raises(ValueError, match="d_model is 4096, but the DiT's text_dim is 32"):
        check_fit(tiny, text_dim=4096)
    with pytest.raises(ValueError, match="z_dim is 4, but the DiT denoises latents of 16 channels"):
        check_fit(tiny, z_dim=4)
    check_fit(tiny, text_dim=32, z_dim=16)  # the presets fit each other
    checkpoint = ["--checkpoint", str(models / "transformer"), "--steps", "1"]
    small = ["--latent-shape", "3", "4", "4", "--out", str(tmp_path / "v.mp4")]
    bad = [(["--prompt", "x", "--context", "c.npy", *small], "either --prompt TEXT or --context"),
           (["--prompt", "x", "--latent-shape", "3", "4", "4", "--out", str(tmp_path / "v.gif")], "--out must end"),
           (["--prompt", "x", "--num-frames", "8", "--out", str(tmp_path / "v.mp4")], "--num-frames must be 1 + 4k"),
           (["--prompt", "x", "--height", "32", *small], "either --latent-shape or --num-frames"),
           (["--prompt", "x", "--vae", str(tmp_path), *small], "--vae: checkpoint_dir must hold config.json"),
           (["--prompt", "x", "--text-encoder", str(models / "vae"), *small], "--text-encoder: ")]
    for extra, message in bad:
        with pytest.raises(SystemExit) as stop:
            sample_cli.cli(checkpoint + extra)
        assert stop.value.code == 2 and message in capsys.readouterr().err, extra


def test_prepare_refuses_bad_captions_and_foreign_folders(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = [('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4"\n', "out", "line 2 is not JSON"),
             ('{"video": "a.mp4", "caption": "x"}\n{"file_name": "b.mp4", "label": 3}\n', "out",
              "line 2 must be an object with a video path"),
             ("\n\n", "out", "lists no clips"),
             ('{"video": "a.mp4", "text": "x"}\n', "other", "holds no prepare.json")]
    for captions, out, message in cases:
        (tmp_path / "videos" / "metadata.jsonl").write_text(captions)
        with pytest.raises(SystemExit) as stop:
            prepare.cli([str(tmp_path / "videos"), str(tmp_path / out), "--vae", "v", "--text-encoder", "t"])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        prepare.cli([str(tmp_path / "videos"), str(tmp_path / "out"), "--vae", "v", "--text-encoder", "t",
                     "--frames", "80"])
    assert stop.value.code == 2 and "--frames must be 1 + 4k" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
