"""Does a narrow model of a teacher recipe learn to draw the shape its caption names, from the clip
distribution? (CPU, ~17 minutes on 2 cores at the defaults)

    python benchmarks/shape_learning.py [--config train/configs/teacher_small_tokens.json] [--steps 2000]
        [--batch 32] [--clips 48] [--guidance 1 4] [--out DIR] [key=value ...]

The distribution's counterpart of `teacher_memorise.py` (whose narrow model, float32, one still shape a clip,
learning rate 1e-3, `teacher_memorise.DEFAULTS`, it trains; here on 2-frame 32 x 32 clips, captions dropped at
the recipe's rate): trains the model from scratch with the recipe's flow-matching objective on the recipe's
million training clips, `--batch` a step, then samples the first `--clips` held-out one-shape captions
(`caption_fidelity`, UniPC 20 steps, at each `--guidance`) and prints, besides `caption_fidelity`'s table, how
the samples' shapes read for each shape the captions name. A model that has learned the shape words reads on
the diagonal; one that draws the same blob for every word reads in one column (the circle's: a blob's silhouette
is round). `data.procedural.shape_kind=square` (every clip a square) is the control in which no word has to
choose the outline: how far the model draws outlines at all after the same steps. `--out` keeps the exported
weights (`DIR/weights`, bf16, `caption_fidelity --weights`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "teacher_small_tokens.json")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.clips) < 1:
        parser.error(f"--steps, --batch and --clips must be >= 1; got {args.steps}, {args.batch}, {args.clips}")
    dropout = load_config(args.config, args.overrides).data.procedural.cfg_dropout  # the recipe's, not DEFAULTS' 0
    overrides = [*DEFAULTS, *DISTRIBUTION, f"data.procedural.cfg_dropout={dropout}", *args.overrides]
    cfg = load_config(args.config, [*overrides, f"data.batch_size={args.batch}", f"steps={args.steps}"])
    result = train(cfg, progress=False)
    print(f"trained {int(result.metrics['step'])} steps, last batch loss {result.metrics['loss']:.4f}\n")
    parts, _ = abstract_model(cfg.model)
    out = Path(tempfile.mkdtemp()) if args.out is None else args.out
    weights = out / "weights"
    tables = {}
    try:
        save_wan_params(str(weights), result.per_layer(result.state.params), parts.config)
        for guidance in args.guidance:
            print(f"guidance {guidance:g}:")
            found = caption_fidelity.main(["--weights", str(weights), "--config", str(args.config), "--clips",
                                           str(args.clips), "--guidance", str(guidance), *overrides])
            tables[guidance] = {name: confusion(found["reads"][name], found["truths"]) for name in ("rendered", "sampled")}
            print("\nshape read (columns) for each caption's shape (rows), rendered | sampled:\n")
            print(f"| caption | {' | '.join(SHAPES)} | | {' | '.join(SHAPES)} |")
            print("|---|" + "---|" * (2 * len(SHAPES) + 1))
            for kind, name in enumerate(SHAPES):
                cells = [" | ".join(str(c) for c in tables[guidance][part][kind]) for part in ("rendered", "sampled")]
                print(f"| {name} | {cells[0]} | | {cells[1]} |")
            print()
    finally:
        if args.out is None:
            shutil.rmtree(out)
    return {"loss": float(result.metrics["loss"]), "confusion": tables}


if __name__ == "__main__":
    main()
