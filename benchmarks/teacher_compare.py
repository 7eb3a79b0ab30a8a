"""Held-out flow-matching loss of teacher directories on the same held-out clips (CPU or GPU).

    python benchmarks/teacher_compare.py DIR [DIR ...] [--clips 8] [--seeds 0 1] [--sizes 16x128x128 8x64x64]
        [--config train/configs/teacher.json]

Each DIR is a converted-model directory (config.json + params/: `train/teacher`, or a stage's
`teacher.tar` from `benchmarks/train_teacher.py` extracted) of `--config`'s architecture (default
`train/configs/teacher.json`; its clips, shift and compute dtype too). For every size (frames x
height x width; default: the config's study size and the demo's 8 x 64 x 64) and
seed, `--clips` held-out procedural clips (split "heldout") at fixed noise levels
(`train.heldout.HeldoutEvaluation`, compute in the config's dtype): the same clips and noise
for every DIR, so a new stage can be compared with the shipped weights before it replaces them
(`train_teacher.py`'s summaries hold seed 0's, 8 clips at both sizes; a converted-model
directory's bf16 weights read back give them to about 1e-4). On the 2-core development VM three
teachers of `teacher.json` at the two default sizes and two seeds took 5 minutes; four of the
wide abspos recipe at seed 0, 15 minutes. Prints each DIR's losses as it finishes and a table
(one row per DIR) last; returns {DIR: {"FxHxW/seedS": loss}}.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from sparge_jax.models import load_wan
from sparge_jax.models.checkpoint import read_wan_config
from sparge_jax.models.wan import architecture_differences
from train.config import DEMO_CONFIG, load_config
from train.heldout import HeldoutEvaluation
from train.model import DTYPES, abstract_model
from train.procedural import clip_spec

CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "teacher.json"
_DEMO_CLIPS = load_config(DEMO_CONFIG).data.procedural
DEMO_SIZE = (_DEMO_CLIPS.frames, _DEMO_CLIPS.height, _DEMO_CLIPS.width)  # of `python -m train`'s clips


def flow_evaluations(parts, procedural, sizes: dict[str, tuple[int, int, int]], clips: int, seed: int, *,
                     shift: float, compute_dtype) -> dict[str, HeldoutEvaluation]:
    """{name: the held-out evaluation of the dense model on `clips` held-out clips of `seed` at
    that size (frames, height, width)}, the clips otherwise as `procedural`
    (`train.config.ProceduralSettings`); its "heldout_flow_loss" is the teacher-free measure."""
    evaluations = {}
    for name, (frames, height, width) in sizes.items():
        spec = clip_spec(dataclasses.replace(procedural, frames=frames, height=height, width=width),
                         parts.config.text_dim, parts.config.in_dim)
        evaluations[name] = HeldoutEvaluation(parts, spec, clips, student_mode="dense", compute_dtype=compute_dtype,
                                              shift=shift, seed=seed)
    return evaluations


def clip_size(text: str) -> tuple[int, int, int]:
    """"FxHxW" -> (frames, height, width)."""
    try:
        frames, height, width = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a clip size is FRAMESxHEIGHTxWIDTH, e.g. 8x64x64; got {text!r}") from None
    return frames, height, width


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sizes", type=clip_size, nargs="+", default=None,
                        help="clip sizes FxHxW (default: the config's and 8x64x64)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the teachers' training config")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not (d / "config.json").is_file()]
    if missing:
        parser.error(f"not a converted-model directory (no config.json): {', '.join(missing)}")

    cfg = load_config(args.config)
    study = cfg.data.procedural
    sizes = args.sizes or [(study.frames, study.height, study.width), DEMO_SIZE]
    parts, _ = abstract_model(cfg.model)
    for directory in args.dirs:
        differences = architecture_differences(read_wan_config(str(directory)), parts.config)
        if differences:
            parser.error(f"{directory} is not the architecture of {args.config.name} "
                         f"(differs in {', '.join(differences)})")
    named = {"x".join(map(str, size)): size for size in sizes}
    evaluations = {}
    for seed in args.seeds:
        by_size = flow_evaluations(parts, study, named, args.clips, seed, shift=cfg.objective.shift,
                                   compute_dtype=DTYPES[cfg.model.compute_dtype])
        evaluations.update({f"{name}/seed{seed}": evaluation for name, evaluation in by_size.items()})
    losses = {}
    for directory in args.dirs:
        params = nnx.state(load_wan(str(directory), param_dtype=jnp.float32), nnx.Param)
        losses[str(directory)] = {name: evaluation(params, params)["heldout_flow_loss"]
                                  for name, evaluation in evaluations.items()}
        print(f"{directory}: " + ", ".join(f"{name} {loss:.4f}" for name, loss in losses[str(directory)].items()),
              flush=True)  # each as it is done: a run cut short keeps the rows it finished
    print(f"\nHeld-out flow-matching loss, {args.clips} clips per seed:\n")
    print("| weights | " + " | ".join(evaluations) + " |")
    print("|---|" + "---|" * len(evaluations))
    for directory, row in losses.items():
        print(f"| {directory} | " + " | ".join(f"{row[name]:.4f}" for name in evaluations) + " |")
    return losses


if __name__ == "__main__":
    main()
