"""Does a narrow model of a teacher recipe learn to draw the shape its caption names, from the clip
distribution? (CPU, ~17 minutes on 2 cores at the defaults; on an H200 15-30 ms a step, four runs sharing it)

    python benchmarks/shape_learning.py [--config train/configs/teacher.json] [--steps 2000 ...]
        [--batch 32] [--clips 48] [--guidance 1 4] [--limit-s S] [--out DIR] [key=value ...]

The distribution's counterpart of `teacher_memorise.py` (whose narrow model, float32, one still shape a clip,
learning rate 1e-3, `teacher_memorise.DEFAULTS`, it trains; here on 2-frame 32 x 32 clips, captions dropped at
the recipe's rate): trains the model from scratch with the recipe's flow-matching objective on the recipe's
million training clips, `--batch` a step, then samples the first `--clips` held-out one-shape captions
(`caption_fidelity`, UniPC 20 steps, at each `--guidance`) and prints, besides `caption_fidelity`'s table, how
the samples' shapes read for each shape the captions name. A model that has learned the shape words reads on
the diagonal; one that draws the same blob for every word reads in one column (the circle's: a blob's silhouette
is round). `data.procedural.shape_kind=square` (every clip a square) is the control in which no word has to
choose the outline: how far the model draws outlines at all after the same steps. Each `--steps` value is a
model of its own, from scratch, on its own schedule (warm-up and cosine decay end at that step); a table of
them all comes last. `--limit-s` ends each training early past that many seconds (`time_limit_s`: the table
says how many steps it trained). On a GPU add `data.procedural.render_on=accelerator`. `--out` keeps, per
`--steps` value, the exported weights (`DIR/steps_N/weights`, bf16, `caption_fidelity --weights`) and the
samples (`DIR/steps_N/guidance_G/caption_fidelity.npz`). With `optim.ema_decay` set the exported and read weights
are the trained weights' EMA, as `train_teacher.py` exports them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import caption_fidelity
import numpy as np
from teacher_memorise import DEFAULTS

from sparge_jax.models.checkpoint import save_wan_params
from train.config import load_config
from train.loop import train
from train.model import abstract_model
from train.procedural import SHAPES

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = ("data.procedural.frames=2", "optim.warmup_steps=50", "data.procedural.examples=1000000",
                "log_every=250")


def confusion(reads: list[dict], truths: list[dict]) -> np.ndarray:
    """Counts int `(len(SHAPES), len(SHAPES))`: rows the caption's shape, columns the shape read (clips whose
    shape was read)."""
    counts = np.zeros((len(SHAPES), len(SHAPES)), int)
    for read, true in zip(reads, truths):
        if "shape" in read:
            counts[true["shape"], read["shape"]] += 1
    return counts


def read_shapes(weights: Path, config: Path, clips: int, guidance: float, overrides: list[str],
                out: Path | None) -> dict:
    """`caption_fidelity` of `weights` at `guidance`, with the caption-shape x read-shape tables printed;
    returns {"rendered"/"sampled": confusion, "right/read": the sampled shape's (right, read)}."""
    print(f"guidance {guidance:g}:")
    found = caption_fidelity.main(["--weights", str(weights), "--config", str(config), "--clips", str(clips),
                                   "--guidance", str(guidance), *([] if out is None else ["--out", str(out)]),
                                   *overrides])
    table = {name: confusion(found["reads"][name], found["truths"]) for name in ("rendered", "sampled")}
    print("\nshape read (columns) for each caption's shape (rows), rendered | sampled:\n")
    print(f"| caption | {' | '.join(SHAPES)} | | {' | '.join(SHAPES)} |")
    print("|---|" + "---|" * (2 * len(SHAPES) + 1))
    for kind, name in enumerate(SHAPES):
        cells = [" | ".join(str(c) for c in table[part][kind]) for part in ("rendered", "sampled")]
        print(f"| {name} | {cells[0]} | | {cells[1]} |")
    print()
    return {**table, "right/read": found["scores"]["sampled"]["shape"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "teacher.json")
    parser.add_argument("--steps", type=int, nargs="+", default=[2000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--limit-s", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if min(*args.steps, args.batch, args.clips) < 1:
        parser.error(f"--steps, --batch and --clips must be >= 1; got {args.steps}, {args.batch}, {args.clips}")
    if args.limit_s is not None and args.limit_s <= 0:
        parser.error(f"--limit-s must be > 0; got {args.limit_s}")
    if len(set(args.steps)) < len(args.steps):
        parser.error(f"--steps values must differ (each is a model of its own, kept as DIR/steps_N); got {args.steps}")
    dropout = load_config(args.config, args.overrides).data.procedural.cfg_dropout  # the recipe's, not DEFAULTS' 0
    overrides = [*DEFAULTS, *DISTRIBUTION, f"data.procedural.cfg_dropout={dropout}", *args.overrides]
    limit = [] if args.limit_s is None else [f"time_limit_s={args.limit_s}"]
    parts, _ = abstract_model(load_config(args.config, overrides).model)  # the same model for every --steps
    runs = []
    for steps in args.steps:
        cfg = load_config(args.config, [*overrides, f"data.batch_size={args.batch}", f"steps={steps}", *limit])
        started = time.perf_counter()
        result = train(cfg, progress=False)
        seconds, done = time.perf_counter() - started, int(result.metrics["step"])
        print(f"trained {done} of {steps} steps in {seconds:.0f} s, last batch loss {result.metrics['loss']:.4f}\n")
        out = Path(tempfile.mkdtemp()) if args.out is None else args.out / f"steps_{steps}"
        try:
            save_wan_params(str(out / "weights"), result.per_layer(result.handed_out()), parts.config)
            tables = {guidance: read_shapes(out / "weights", args.config, args.clips, guidance, overrides,
                                            None if args.out is None else out / f"guidance_{guidance:g}")
                      for guidance in args.guidance}
        finally:
            if args.out is None:
                shutil.rmtree(out)
        runs.append({"steps": steps, "done": done, "seconds": seconds, "loss": float(result.metrics["loss"]),
                     "reads": tables})
    print("| steps planned | trained | s | last batch loss | "
          + " | ".join(f"shape right / read, guidance {g:g}" for g in args.guidance) + " |")
    print("|---|---|---|---|" + "---|" * len(args.guidance))
    for run in runs:
        cells = [f"{right} / {read}" for right, read in (run["reads"][g]["right/read"] for g in args.guidance)]
        print(f"| {run['steps']} | {run['done']} | {run['seconds']:.0f} | {run['loss']:.4f} | {' | '.join(cells)} |")
    return {"runs": runs}


if __name__ == "__main__":
    main()
