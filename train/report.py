"""End-of-run report of a distillation on procedural clips (what `python -m train` prints).

Achieved block sparsity of the student's masks, the held-out student-teacher velocity gap
before -> after, and the PSNR of sparse samples against the dense teacher's samples (same
noise, same captions) before -> after training, plus a picture of those samples.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.dtypes import DTYPES
from sparge_jax.tools.sample import psnr
from sparge_jax.tools.viz import figure, save_png
from train.config import TrainConfig
from train.generate import generate, layer_sparsity, make_velocity
from train.model import abstract_model, wan_config
from train.procedural import ProceduralClips, clip_spec, depth_to_space, latents_to_rgb


def sample_psnr(samples: np.ndarray, reference: np.ndarray, s: int) -> float:
    """PSNR (dB) of decoded pixel clips (clipped to [-1, 1]) against the reference's."""
    decode = lambda x: np.clip(depth_to_space(np.asarray(x, np.float32), s), -1.0, 1.0)
    return psnr(decode(samples), decode(reference))


def evenly_spaced(count: int, picks: int) -> np.ndarray:
    """`picks` evenly spaced indices of `count` frames, first and last included (int array)."""
    return np.linspace(0, count - 1, picks).round().astype(int)


def save_strip(path: Path, rows: dict[str, np.ndarray], frames: int = 4, of_frames: int | None = None) -> np.ndarray:
    """PNG of `frames` evenly spaced frames of each uint8 clip `(F, H, W, 3)` in `rows` (one row each).
    `of_frames`: the clips are already `F` evenly spaced frames of clips this long (the titles then
    number the frames of those clips). Returns the frame numbers the columns are titled with."""
    stored = len(next(iter(rows.values())))
    picks = evenly_spaced(stored, frames)
    numbers = picks if of_frames is None else evenly_spaced(of_frames, stored)[picks]
    fig = figure(1.6 * frames + 1.4, 1.6 * len(rows))
    axes = fig.subplots(len(rows), frames, squeeze=False)
    for r, (label, clip) in enumerate(rows.items()):
        for c, f in enumerate(picks):
            axes[r, c].imshow(clip[f], interpolation="nearest")
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"frame {numbers[c]}", fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)
    return numbers


def distillation_report(cfg: TrainConfig, result, *, clips: int = 2, steps: int = 10, guidance: float = 1.0,
                        picture: str | Path | None = None) -> dict:
    """Summary dict of a finished run of `train(cfg)` (procedural data, `eval_every` > 0):
    sparsity, held-out gap before/after (under the captions, of the unconditional branch and of
    the guided velocity at `cfg.eval_guidance`), sample PSNR vs dense before/after at `guidance`
    and ("guided_psnr_*") at `cfg.eval_guidance`; writes `picture` (PNG, at `guidance`). "After"
    is the EMA of the trained weights when the run keeps one (`after_weights` "ema"), else the
    trained weights ("raw").

    The picture's samples are conditional (guidance 1 by default); with guidance, conditional
    distillation leaves the guided velocity's error about as it was (`objective.distill_guidance`
    targets it; docs/quality.md)."""
    parts, _ = abstract_model(cfg.model)
    config = wan_config(cfg.model)
    dtype = DTYPES[cfg.model.compute_dtype]
    spec = clip_spec(cfg.heldout_procedural, config.text_dim, config.in_dim)
    batch = ProceduralClips(spec, clips, seed=cfg.data.seed, split="heldout").read(np.arange(clips))
    before = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), result.per_layer(result.teacher))
    after, ema = result.per_layer(result.handed_out()), "" if result.ema_params is None else "_ema"
    # One compiled forward (op by op it compiles ~180 small programs: minutes on a GPU box).
    per_layer = jax.jit(lambda params: layer_sparsity(parts, params, batch, 0.5))(after)
    sparsity = float(np.mean(np.asarray(per_layer, np.float64)))

    noise = jax.random.normal(jax.random.key(cfg.seed), batch["latents"].shape, jnp.float32)
    context = jnp.asarray(batch["context"])
    dense_velocity, sparse = make_velocity(parts, "dense", dtype), make_velocity(parts, "sparse", dtype)

    def samples(scale: float):
        """(dense, sparse before, sparse after) latents sampled at guidance `scale`."""
        kwargs = dict(steps=steps, shift=cfg.objective.shift, guidance=scale)
        return tuple(generate(velocity, params, noise, context, **kwargs)
                     for velocity, params in ((dense_velocity, before), (sparse, before), (sparse, after)))

    dense, sparse_before, sparse_after = samples(guidance)
    s = spec.space_to_depth
    first, last = result.evaluations[0], result.evaluations[-1]
    summary = {
        "block_sparsity": sparsity,
        "after_weights": "ema" if ema else "raw",
        "gap_before": first["heldout_gap"], "gap_after": last["heldout_gap" + ema],
        "uncond_gap_before": first["heldout_uncond_gap"], "uncond_gap_after": last["heldout_uncond_gap" + ema],
        "guided_gap_before": first["heldout_guided_gap"], "guided_gap_after": last["heldout_guided_gap" + ema],
        "psnr_before_db": sample_psnr(sparse_before, dense, s), "psnr_after_db": sample_psnr(sparse_after, dense, s),
        "steps": last["step"],
    }
    if cfg.eval_guidance != guidance:  # the samples a guided sampler gives, at the held-out guided gap's scale
        guided_dense, guided_before, guided_after = samples(cfg.eval_guidance)
        summary.update(guided_psnr_before_db=sample_psnr(guided_before, guided_dense, s),
                       guided_psnr_after_db=sample_psnr(guided_after, guided_dense, s))
    if picture is not None:
        save_strip(Path(picture), {"dense teacher": latents_to_rgb(dense[0], s),
                                   "sparse, before": latents_to_rgb(sparse_before[0], s),
                                   "sparse, distilled": latents_to_rgb(sparse_after[0], s),
                                   "held-out clip": latents_to_rgb(batch["latents"][0], s)})
        summary["picture"] = str(picture)
    return summary
