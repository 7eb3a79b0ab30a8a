"""Video files <-> frames, through the FFmpeg binary that the `imageio-ffmpeg` wheel ships (the
optional `video` extra): read any format FFmpeg reads (mp4, webm, mkv, mov, avi, gif, ...)
resized to cover a target size, centre-cropped and resampled in time; write H.264 mp4.

Frames are uint8 `(frames, height, width, 3)` RGB; the VAE's pixels are float32 in [-1, 1]
(`to_unit_range` / `to_uint8` convert). `video_scores` compares two videos (PSNR, SSIM with
scikit-image, the `bench` extra).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np

MISSING = "reading and writing videos needs imageio-ffmpeg, an optional extra: pip install 'sparge-jax[video]'"
MISSING_SSIM = "SSIM needs scikit-image, an optional extra: pip install 'sparge-jax[bench]'"
# Suffixes `write_video` and the sampler's --out take as a video (FFmpeg picks the container from it).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


def require_ffmpeg():
    """The imageio_ffmpeg module; ValueError(`MISSING`) without the `video` extra."""
    try:
        import imageio_ffmpeg
    except ModuleNotFoundError:
        raise ValueError(MISSING) from None
    return imageio_ffmpeg


@contextlib.contextmanager
def _quiet_ffmpeg():
    """Silence two harmless notices while FFmpeg starts: JAX's warning about os.fork (the child
    runs FFmpeg at once) and imageio-ffmpeg's note that the frame size read differs from the
    file's (it does whenever we resize)."""
    logger = logging.getLogger("imageio_ffmpeg")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            yield
    finally:
        logger.setLevel(level)


def _ffmpeg_reason(error: Exception) -> str:
    """The line of an FFmpeg failure that says what went wrong (its stderr's last line that is
    not the banner), or the error itself."""
    text = str(error)
    if "=== stderr ===" not in text:
        return text.strip().splitlines()[0] if text.strip() else type(error).__name__
    head, stderr = text.split("=== stderr ===", 1)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()
             and not line.lstrip().startswith(("ffmpeg version", "built with", "configuration:", "lib"))]
    return f"{head.strip()}: {lines[-1]}" if lines else head.strip()


def read_video(path: str | Path, *, frames: int | None = None, size: tuple[int, int] | None = None,
               fps: float | None = None) -> np.ndarray:
    """Frames uint8 `(n, height, width, 3)` of the video file `path`.

    frames: read only the first `frames` (after any fps resampling); ValueError if the video
      has fewer. size: `(height, width)`: each frame scaled (Lanczos, aspect ratio kept) to the
      smallest size covering it, then centre-cropped to it. fps: resample in time to this rate
      (frames dropped or repeated, as FFmpeg's fps filter does); None keeps the file's frames.
    An unreadable file is a ValueError naming it and FFmpeg's reason."""
    ffmpeg = require_ffmpeg()
    filters = []
    if fps is not None:
        filters.append(f"fps={fps}")
    if size is not None:
        height, width = size
        filters += [f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=lanczos",
                    f"crop={width}:{height}"]
    output = (["-vf", ",".join(filters)] if filters else []) + (["-frames:v", str(frames)] if frames else [])
    try:
        with _quiet_ffmpeg():
            reader = ffmpeg.read_frames(str(path), output_params=output)
            meta = next(reader)
        width, height = meta["size"]
        out = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
    except (OSError, RuntimeError, StopIteration) as error:
        raise ValueError(f"cannot read video {path}: {_ffmpeg_reason(error)}") from None
    if not out:
        raise ValueError(f"video {path} holds no frames")
    if frames is not None and len(out) < frames:
        raise ValueError(f"video {path} has {len(out)} frames{f' at {fps:g} fps' if fps else ''}; {frames} needed")
    return np.stack(out)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 16, quality: float = 8) -> Path:
    """Write uint8 frames `(n, height, width, 3)` (height and width even) as an H.264 video
    (yuv420p, the pixel format players expect) at `fps`; quality 0-10 (10: best, largest)."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be uint8 (n, height, width, 3) with n >= 1; got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames' height and width must be even for H.264; got {frames.shape[1]}x{frames.shape[2]}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"video path must end in one of {', '.join(VIDEO_SUFFIXES)}; got {path}")
    writer = require_ffmpeg().write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, quality=quality,
                                    macro_block_size=2, ffmpeg_log_level="error")
    with _quiet_ffmpeg():
        writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    return path


def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1] (the VAE's pixels)."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(video) -> np.ndarray:
    """float pixels in [-1, 1] (clipped) -> uint8 frames, rounded."""
    return np.round((np.clip(np.asarray(video, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def video_scores(video: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (dB, peak 255) over the whole video and SSIM (scikit-image, colour, mean over
    frames) of uint8 `video` against `reference`, both `(n, height, width, 3)`."""
    try:
        from skimage.metrics import structural_similarity
    except ModuleNotFoundError:
        raise ValueError(MISSING_SSIM) from None
    if video.shape != reference.shape:
        raise ValueError(f"videos must have one shape to compare; got {video.shape} and {reference.shape}")
    mse = np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2)
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
    ssim = [structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(video, reference)]
    return {"psnr_db": psnr, "ssim": float(np.mean(ssim))}
