"""Videos + captions -> training data: `python -m train.prepare VIDEOS OUT --vae DIR --text-encoder DIR`
(also `sparge-prepare`).

Each line of the captions file (JSONL, default `VIDEOS/metadata.jsonl`) names one clip:
`{"video": "clips/a.mp4", "caption": "a cat ..."}` (`file_name` and `text` / `prompt` are
taken too, as in a Hugging Face `videofolder`), paths relative to VIDEOS. Every clip is read
with FFmpeg (`sparge_jax.video`: resampled to --fps, scaled to cover --height x --width,
centre-cropped, its first --frames frames), encoded by the Wan VAE into normalised latents
`(1 + (frames - 1) / 4, height / 8, width / 8, z_dim)`, and its caption by the umT5 text encoder
into `(512, d_model)`; both go into `sparge-latents-v1` shards (`train.data`), a shard per
--examples-per-shard caption lines.

Resumable: the index is rewritten after every shard, and `OUT/prepare.json` records which caption
lines each finished shard covers and the clips it skipped; a second run with the same
settings skips finished shards. A clip that cannot be read (missing, damaged, too short) is
skipped and listed, never fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from flax import nnx

from sparge_jax.cli import HelpFormatter, exit_on_user_error

PROG = "sparge-prepare"
MANIFEST = "prepare.json"
VIDEO_KEYS, CAPTION_KEYS = ("video", "file_name"), ("caption", "text", "prompt")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Clip:
    """One caption line: its number (1-based), the video file, the caption."""

    line: int
    video: Path
    caption: str


def read_captions(path: Path, videos: Path) -> list[Clip]:
    """The clips a JSONL captions file lists (video paths relative to `videos`); a ValueError
    naming the file and line for a line that is not a JSON object with a video and a caption."""
    if not path.is_file():
        raise ValueError(f"--captions: {path} does not exist (one JSON line per clip: "
                         '{"video": "a.mp4", "caption": "..."})')
    clips = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON: {error}") from None
        video = next((row[k] for k in VIDEO_KEYS if isinstance(row, dict) and k in row), None)
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row, dict) and k in row), None)
        if not isinstance(video, str) or not isinstance(caption, str):
            raise ValueError(f"{path} line {number} must be an object with a video path ({' or '.join(VIDEO_KEYS)}) "
                             f"and a caption ({' or '.join(CAPTION_KEYS)}), both strings; got {text.strip()[:120]}")
        clips.append(Clip(number, videos / video, caption))
    if not clips:
        raise ValueError(f"--captions: {path} lists no clips")
    return clips


# the VAE's encode, jitted once (compiled once per video shape for every run in a process)
encode_video = nnx.jit(lambda model, video: model.encode(video))


def group_digest(group: list[Clip]) -> str:
    """A digest of the caption lines of one shard (line numbers, video paths, captions)."""
    text = json.dumps([[clip.line, str(clip.video), clip.caption] for clip in group])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("videos", help="folder holding the videos (and, by default, metadata.jsonl)")
    p.add_argument("out", help="output folder of the data set (created; a folder from an earlier run is resumed)")
    p.add_argument("--captions", default=None, help="JSONL captions file (default: VIDEOS/metadata.jsonl)")
    p.add_argument("--vae", required=True, help="converted Wan VAE folder (sparge-convert Wan2.1_VAE.pth DIR)")
    p.add_argument("--text-encoder", required=True,
                   help="converted umT5 folder with its tokenizer/ (sparge-convert models_t5_umt5-xxl-enc-bf16.pth DIR)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 1 + 4k (Wan2.1: 81)")
    p.add_argument("--height", type=int, default=480,
                   help="frame height in pixels, a multiple of 8 (16 for the Wan DiT's 2 x 2 patches)")
    p.add_argument("--width", type=int, default=832,
                   help="frame width in pixels, a multiple of 8 (16 for the Wan DiT's 2 x 2 patches)")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate clips are resampled to (Wan2.1: 16); 0 keeps "
                                                          "each file's own frames")
    p.add_argument("--examples-per-shard", type=int, default=16, help="caption lines per shard")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the shards store")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    from sparge_jax.models.wan_vae import FRAMES_PER_CHUNK, SPATIAL_FACTOR

    if args.frames < 1 or (args.frames - 1) % FRAMES_PER_CHUNK:
        p.error(f"--frames must be 1 + {FRAMES_PER_CHUNK}k (1, 5, ..., 81); got {args.frames}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < SPATIAL_FACTOR or value % SPATIAL_FACTOR:
            p.error(f"--{name} must be a positive multiple of {SPATIAL_FACTOR}; got {value}")
    if args.fps < 0:
        p.error(f"--fps must be positive (or 0: the files' own frames); got {args.fps}")
    if args.examples_per_shard < 1:
        p.error(f"--examples-per-shard must be at least 1; got {args.examples_per_shard}")
    if not Path(args.videos).is_dir():
        p.error(f"videos: {args.videos} is not a folder")


def settings_of(args) -> dict:
    """What decides the shards' contents: a resumed run must match it."""
    return {"videos": str(Path(args.videos).resolve()), "captions": str(Path(args.captions).resolve()),
            "vae": str(Path(args.vae).resolve()), "text_encoder": str(Path(args.text_encoder).resolve()),
            "frames": args.frames, "height": args.height, "width": args.width, "fps": args.fps,
            "examples_per_shard": args.examples_per_shard, "dtype": args.dtype}


def read_manifest(out: Path, settings: dict) -> dict:
    """The manifest of an earlier run into `out` (empty for a new folder); a ValueError when
    `out` holds something else or was prepared with other settings."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"out: {out} exists and holds no {MANIFEST} (not an earlier sparge-prepare run); "
                             "give a new or empty folder")
        return {"settings": settings, "shards": {}}
    found = json.loads(manifest.read_text())
    if found.get("settings") != settings:
        differ = sorted(k for k in settings if found.get("settings", {}).get(k) != settings[k])
        raise ValueError(f"out: {out} was prepared with other settings ({', '.join(differ)} differ: "
                         f"{[found.get('settings', {}).get(k) for k in differ]} then, {[settings[k] for k in differ]} "
                         "now); give a new folder or the same settings to resume")
    return found


def write_json(path: Path, value) -> None:
    """Write JSON atomically (a temporary file renamed)."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(value, indent=1))
    temporary.replace(path)


def prepare(args) -> dict:
    """Run the preparation of parsed `args`; returns the summary it prints."""
    import ml_dtypes
    from tqdm import tqdm

    from sparge_jax.models import load_text_encoder, load_wan_vae
    from sparge_jax.video import read_video, require_ffmpeg, to_unit_range
    from train.data import FIELDS, write_index, write_shard

    require_ffmpeg()  # before any clip: without the extra, each would be skipped as unreadable
    videos, out = Path(args.videos), Path(args.out)
    clips = read_captions(Path(args.captions), videos)
    settings = settings_of(args)
    manifest = read_manifest(out, settings)
    vae = load_wan_vae(args.vae)
    text_encoder = load_text_encoder(args.text_encoder)
    if text_encoder.tokenizer is None:
        raise ValueError(f"--text-encoder: {args.text_encoder} has no tokenizer/ folder (convert the umT5 checkpoint "
                         "again with --tokenizer DIR)")
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    size, fps = (args.height, args.width), (args.fps or None)
    out.mkdir(parents=True, exist_ok=True)
    per = args.examples_per_shard
    groups = [clips[i:i + per] for i in range(0, len(clips), per)]
    done = manifest["shards"]
    resumed = len(done)
    if any(int(number) >= len(groups) for number in done):
        raise ValueError(f"--captions has fewer lines than when the shards in {out} were written; give a new out folder")
    shapes = manifest.get("field_shapes")
    bar = tqdm(total=len(clips), initial=sum(len(g) for k, g in enumerate(groups) if str(k) in done),
               desc="clips", unit="clip", disable=args.no_progress, file=sys.stderr)
    for number, group in enumerate(groups):
        lines, digest = [clip.line for clip in group], group_digest(group)
        if str(number) in done:
            if done[str(number)]["digest"] != digest:
                raise ValueError(f"--captions changed since shard {number} was written (it covered lines "
                                 f"{done[str(number)]['lines']}); give a new out folder")
            continue
        latents, kept, skipped = [], [], []
        for clip in group:
            try:
                frames = read_video(clip.video, frames=args.frames, size=size, fps=fps)
            except ValueError as error:
                skipped.append({"line": clip.line, "video": str(clip.video), "reason": str(error)})
                bar.set_postfix(skipped=sum(len(s["skipped"]) for s in done.values()) + len(skipped))
            else:
                latents.append(np.asarray(encode_video(vae, to_unit_range(frames)[None]))[0])
                kept.append(clip)
            bar.update()
        record = {"lines": lines, "digest": digest, "file": None, "count": len(kept), "skipped": skipped}
        if kept:
            context = np.asarray(text_encoder([clip.caption for clip in kept]))
            arrays = {"latents": np.stack(latents), "context": context}
            record.update(write_shard(out, number, arrays, dtype))
            shapes = {name: list(arrays[name].shape[1:]) for name in FIELDS}
            manifest["field_shapes"] = shapes
            entries = [{"file": s["file"], "count": s["count"]} for k, s in
                       sorted({**done, str(number): record}.items(), key=lambda kv: int(kv[0])) if s["file"]]
            write_index(out, entries, shapes, dtype)
        done[str(number)] = record
        write_json(out / MANIFEST, manifest)
    bar.close()
    skipped = [s for _, r in sorted(done.items(), key=lambda kv: int(kv[0])) for s in r["skipped"]]
    examples = sum(r["count"] for r in done.values())
    shards = sum(1 for r in done.values() if r["file"])
    if skipped:
        print(f"skipped {len(skipped)} clip(s):", file=sys.stderr)
        for s in skipped:
            print(f"  line {s['line']}: {s['reason']}", file=sys.stderr)
    if not examples:
        raise ValueError(f"no clip of {args.captions} could be read; nothing written")
    print(f"wrote {examples} examples in {shards} shards to {out.resolve()} (latents {shapes['latents']}, context "
          f"{shapes['context']}, {args.dtype}); {len(skipped)} clip(s) skipped; {resumed} shard(s) were done before")
    return {"out": str(out), "examples": examples, "shards": shards, "skipped": skipped, "resumed_shards": resumed}


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    if args.captions is None:
        args.captions = os.path.join(args.videos, "metadata.jsonl")
    check_args(p, args)
    return prepare(args)


def cli(argv=None) -> None:
    """The command line: user errors are one line on stderr and exit status 2."""
    exit_on_user_error(PROG, main, argv)


if __name__ == "__main__":
    cli()
