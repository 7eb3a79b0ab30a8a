"""Prompts in, videos out, for the sampler (`python -m sparge_jax.tools.sample --prompt "..." --out a.mp4`):
its options, where the converted text encoder and VAE are found, the rule that they fit the DiT,
and the decoded videos it writes.

Folders: `--checkpoint` is a converted DiT (config.json + params/) or a folder holding one as
`transformer/`, as diffusers lays out a Wan pipeline; the text encoder and the VAE are taken
from `--text-encoder` / `--vae`, else from `text_encoder/` and `vae/` inside or beside it.
Fit: the DiT's `text_dim` must equal the text encoder's `d_model` (it cross-attends to the umT5
hidden states) and its `out_dim` (t2v: also `in_dim`) the VAE's `z_dim` (it denoises VAE latents).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flax import nnx

from sparge_jax.models.checkpoint import CONFIG_FILE
from sparge_jax.models.wan_vae import FRAMES_PER_CHUNK, SPATIAL_FACTOR
from sparge_jax.video import VIDEO_SUFFIXES

# Wan2.1's 480p video: 81 frames of 480 x 832 (latents 21 x 60 x 104).
DEFAULT_VIDEO = {"num_frames": 81, "height": 480, "width": 832}
# the VAE's decode, jitted once (compiled once per latent shape for every run in a process)
decode_latents = nnx.jit(lambda model, latents: model.decode(latents))
# what `sparge-convert` converts into each folder
SOURCES = {"text_encoder": "models_t5_umt5-xxl-enc-bf16.pth (or a diffusers text_encoder/)",
           "vae": "Wan2.1_VAE.pth (or a diffusers vae/)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler's prompt and video options."""
    p.add_argument("--prompt", default=None, help="the prompt, encoded by the umT5 text encoder (default: none; give --prompt or --context)")
    p.add_argument("--negative-prompt", default=None,
                   help="with --prompt: the negative prompt of classifier-free guidance (default: the empty prompt, "
                        "as in diffusers' WanPipeline)")
    p.add_argument("--text-encoder", default=None,
                   help="converted umT5 folder with tokenizer/ (default: text_encoder/ inside or beside --checkpoint)")
    p.add_argument("--vae", default=None,
                   help="converted Wan VAE folder, for a video --out (default: vae/ inside or beside --checkpoint)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="video frames, 1 + 4k (instead of --latent-shape; default 81)")
    p.add_argument("--height", type=int, default=None,
                   help="video height, a multiple of 16 for the Wan DiT's 2 x 2 patches of 8 x 8 VAE pixels "
                        "(default 480)")
    p.add_argument("--width", type=int, default=None, help="video width, a multiple of 16 likewise (default 832)")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate of a video --out (Wan2.1 makes 16 fps)")


def is_video_path(path) -> bool:
    """Whether `path` names a video the sampler writes (by its suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Checks of the prompt and video options; sets `args.latent_shape` (from --latent-shape or
    the video size) and `args.checkpoint` (the DiT folder)."""
    if (args.prompt is None) == (args.context is None):
        p.error("give either --prompt TEXT or --context FILE (precomputed embeddings)")
    if args.prompt is not None and args.negative_context is not None:
        p.error("--negative-context goes with --context; with --prompt give --negative-prompt")
    if args.prompt is None and args.negative_prompt is not None:
        p.error("--negative-prompt goes with --prompt; with --context give --negative-context")
    if Path(args.out).suffix.lower() not in (".npy", *VIDEO_SUFFIXES):
        p.error(f"--out must end in .npy (latents) or a video suffix ({', '.join(VIDEO_SUFFIXES)}); got {args.out}")
    if args.fps <= 0:
        p.error(f"--fps must be positive; got {args.fps}")
    video = {name: getattr(args, name) for name in DEFAULT_VIDEO}
    if args.latent_shape is not None and any(v is not None for v in video.values()):
        p.error("give either --latent-shape or --num-frames / --height / --width, not both")
    if args.latent_shape is None:
        video = {name: DEFAULT_VIDEO[name] if v is None else v for name, v in video.items()}
        if video["num_frames"] < 1 or (video["num_frames"] - 1) % FRAMES_PER_CHUNK:
            p.error(f"--num-frames must be 1 + {FRAMES_PER_CHUNK}k (1, 5, ..., 81); got {video['num_frames']}")
        for name in ("height", "width"):
            if video[name] < SPATIAL_FACTOR or video[name] % SPATIAL_FACTOR:
                p.error(f"--{name} must be a positive multiple of {SPATIAL_FACTOR}; got {video[name]}")
        args.latent_shape = (1 + (video["num_frames"] - 1) // FRAMES_PER_CHUNK,
                             video["height"] // SPATIAL_FACTOR, video["width"] // SPATIAL_FACTOR)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / CONFIG_FILE).is_file() and (checkpoint / "transformer" / CONFIG_FILE).is_file():
        args.checkpoint = str(checkpoint / "transformer")


def find_component(option: str, given: str | None, checkpoint: str, name: str) -> str:
    """The folder of component `name` ("vae", "text_encoder"): `given`, else `name/` inside or
    beside the DiT folder `checkpoint` (or its parent, a diffusers-style pipeline folder)."""
    if given is not None:
        return given
    dit = Path(checkpoint).resolve()
    for candidate in (dit / name, dit.parent / name):
        if (candidate / CONFIG_FILE).is_file():
            return str(candidate)
    raise ValueError(f"{option}: not given, and no converted {name}/ inside or beside --checkpoint {checkpoint}; "
                     f"give the folder that sparge-convert made from {SOURCES[name]}")


def check_fit(dit, *, text_dim: int | None = None, z_dim: int | None = None) -> None:
    """ValueError unless the text encoder's `text_dim` (d_model) and the VAE's `z_dim` fit the
    DiT's `WanConfig` `dit` (None: not checked)."""
    if text_dim is not None and text_dim != dit.text_dim:
        raise ValueError(f"--text-encoder: its d_model is {text_dim}, but the DiT's text_dim is {dit.text_dim}; "
                         "they must be equal (umT5-XXL: 4096 for every Wan2.1 DiT; the tiny presets: 32)")
    if z_dim is not None and z_dim != dit.out_dim:
        raise ValueError(f"--vae: its z_dim is {z_dim}, but the DiT denoises latents of {dit.out_dim} channels "
                         "(out_dim); they must be equal (Wan2.1: 16)")


def encode_prompts(args, dit) -> tuple[np.ndarray, np.ndarray]:
    """(context, negative context) float32 `(1, 512, text_dim)` of `--prompt` and
    `--negative-prompt`, encoded by the text encoder found for `args`."""
    from sparge_jax.models import load_text_encoder

    folder = find_component("--text-encoder", args.text_encoder, args.checkpoint, "text_encoder")
    try:
        encoder = load_text_encoder(folder)
    except ValueError as error:
        raise ValueError(f"--text-encoder: {error}") from None
    if encoder.tokenizer is None:
        raise ValueError(f"--text-encoder: {folder} has no tokenizer/ (convert the umT5 checkpoint again with "
                         "--tokenizer DIR)")
    check_fit(dit, text_dim=encoder.model.config.d_model)
    both = np.asarray(encoder([args.prompt, args.negative_prompt or ""]))
    return both[:1], both[1:]


class VideoDecoder:
    """The VAE found for `args` (checked against the DiT's `WanConfig` `dit`): latents -> uint8
    video `(frames, height, width, 3)`, written at `args.fps`."""

    def __init__(self, args, dit):
        from sparge_jax.models import load_wan_vae
        from sparge_jax.video import require_ffmpeg

        require_ffmpeg()
        self.folder = find_component("--vae", args.vae, args.checkpoint, "vae")
        try:
            self.vae = load_wan_vae(self.folder)
        except ValueError as error:
            raise ValueError(f"--vae: {error}") from None
        check_fit(dit, z_dim=self.vae.config.z_dim)
        self.fps = args.fps

    def frames(self, latents: np.ndarray) -> np.ndarray:
        """Latents `(1, F, H, W, z_dim)` (normalised) -> uint8 `(1 + 4 (F - 1), 8H, 8W, 3)`."""
        from sparge_jax.video import to_uint8

        return to_uint8(decode_latents(self.vae, latents)[0])

    def write(self, path: Path, latents: np.ndarray) -> np.ndarray:
        """Decode `latents`, write the video to `path`; returns its frames."""
        from sparge_jax.video import write_video

        frames = self.frames(latents)
        write_video(path, frames, fps=self.fps)
        print(f"wrote video {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} at {self.fps:g} fps "
              f"to {Path(path).resolve()}")
        return frames

    def compare(self, out: Path, sparse_frames: np.ndarray, dense_latents: np.ndarray) -> dict:
        """Write the dense video (`<out>_dense`) and dense | sparse side by side
        (`<out>_dense_vs_sparse`); returns the paths and PSNR / SSIM of the sparse frames
        against the dense ones (decoded pixels, before video compression)."""
        from sparge_jax.video import video_scores, write_video

        dense_path = out.with_name(f"{out.stem}_dense{out.suffix}")
        pair_path = out.with_name(f"{out.stem}_dense_vs_sparse{out.suffix}")
        dense = self.write(dense_path, dense_latents)
        write_video(pair_path, np.concatenate([dense, sparse_frames], axis=2), fps=self.fps)
        scores = video_scores(sparse_frames, dense)
        print(f"wrote dense (left) | sparse (right) to {pair_path.resolve()}; sparse vs dense video: "
              f"PSNR {scores['psnr_db']:.2f} dB, SSIM {scores['ssim']:.4f}")
        return {"dense_out": str(dense_path), "side_by_side_out": str(pair_path),
                "video_psnr_db": scores["psnr_db"], "video_ssim": scores["ssim"]}
