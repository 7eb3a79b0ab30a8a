"""Figures of docs/teacher.md and docs/quality.md from the outputs of the runs.

    python benchmarks/quality_figures.py --teacher DIR --quality DIR --demo-metrics FILE --out docs/images

teacher DIR: what benchmarks/train_teacher.py wrote (teacher_metrics.jsonl, teacher_samples.npz);
quality DIR: what benchmarks/quality.py wrote (quality.json, frames.npz); demo metrics: the
JSONL of a `python -m train` run. Writes PNGs named teacher_*.png, quality_*.png (quality_gap.png:
the fine-tuned rows' held-out velocity gap against the step), demo_gap.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sparge_jax.tools.viz import figure, save_png
from train.report import save_strip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def teacher_figures(directory: Path, out: Path) -> None:
    records = read_jsonl(directory / "teacher_metrics.jsonl")
    fig = figure(5.5, 3.2)
    ax = fig.add_subplot()
    # Records of a stage on other clips than the study's carry "clips" (e.g. "16x64x64"): their
    # losses are of another size, so they get their own lines.
    for clips in dict.fromkeys(r.get("clips") for r in records):
        rows = [r for r in records if r.get("clips") == clips]
        suffix = "" if clips is None else f", {clips} clips"
        train_rows = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "heldout_flow_loss" in r]
        ema = [r for r in evals if "heldout_flow_loss_ema" in r]
        colour = None
        for stage in dict.fromkeys(r.get("stage") for r in train_rows):  # no line across another size's stage
            part = [r for r in train_rows if r.get("stage") == stage]
            (line,) = ax.plot([r["step"] for r in part], [r["loss"] for r in part], lw=0.8, color=colour,
                              label=None if colour else f"training loss (batch){suffix}")
            colour = line.get_color()
        ax.plot([r["step"] for r in evals], [r["heldout_flow_loss"] for r in evals], "o", ms=4,
                label=f"held-out flow loss{suffix}")
        if ema:
            ax.plot([r["step"] for r in ema], [r["heldout_flow_loss_ema"] for r in ema], "s", ms=3,
                    label=f"held-out flow loss, EMA weights{suffix}")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("flow-matching MSE"), ax.legend(), ax.grid(alpha=0.3)
    save_png(fig, out / "teacher_loss.png")
    samples = np.load(directory / "teacher_samples.npz")
    rows = {}
    for i in range(3):
        rows[f"clip {i}: held-out"] = samples["heldout"][i]
        rows[f"clip {i}: teacher"] = samples["samples"][i]
    save_strip(out / "teacher_samples.png", rows, frames=4)


def quality_figures(directory: Path, out: Path) -> None:
    results = json.loads((directory / "quality.json").read_text())
    fig = figure(7.5, 3.2)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in results["free"]):
        rs = sorted((r for r in results["free"] if r["method"] == method), key=lambda r: r["sparsity"])
        ax.plot([r["sparsity"] for r in rs], [r["psnr_db"] for r in rs], "o-", label=f"{method} (training-free)")
    for rule, objective in dict.fromkeys((r["rule"], r["objective"]) for r in results["tuned"]):
        rs = [r for r in results["tuned"] if (r["rule"], r["objective"]) == (rule, objective)]
        psnr = [r["psnr_db"] for r in rs]
        ax.errorbar([np.mean([r["sparsity"] for r in rs])], [np.mean(psnr)], yerr=[np.ptp(psnr) / 2], fmt="s",
                    capsize=3, label=f"{rule}, fine-tuned ({objective}, {len(rs)} seeds)")
    ax.set_xlabel("achieved block sparsity"), ax.set_ylabel("PSNR vs dense (dB)"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_png(fig, out / "quality_vs_sparsity.png")
    frames = np.load(directory / "frames.npz")
    save_strip(out / "quality_frames.png", {name: frames[name] for name in strip_rows(results, frames.files)},
               frames=4, of_frames=results["latent_shape"][0])
    if results["tuned"]:
        finetune_gap_figure(results["tuned"], out / "quality_gap.png")


def strip_rows(results: dict, names: list[str]) -> list[str]:
    """The frame strips shown: dense, the training-free Top-k / Top-p / hybrid at the lowest and
    highest targets, and the first seed of every fine-tuned row."""
    targets = sorted({r["target"] for r in results["free"]})
    free = [f"{m}_{t}" for t in (targets[:1] + targets[-1:]) for m in ("topk", "topp", "hybrid")]
    seed = min((r["seed"] for r in results["tuned"]), default=0)
    tuned = [f"tuned_{r['rule']}_{r['objective']}_{seed}" for r in results["tuned"] if r["seed"] == seed]
    return [n for n in ["dense", *dict.fromkeys(free), *tuned] if n in names]


def finetune_gap_figure(tuned: list[dict], path: Path) -> None:
    """Held-out student-teacher velocity gap against the fine-tuning step, one line per Table 2
    row and seed (one colour per rule and objective)."""
    fig = figure(5.5, 3.4)
    ax = fig.add_subplot()
    colours, first_seed = {}, min(r["seed"] for r in tuned)
    for r in tuned:
        name = f"{r['rule']} {r['objective']}"
        colour = colours.setdefault(name, f"C{len(colours)}")
        evals = [e for e in r["evaluations"] if "heldout_gap" in e]
        ax.plot([e["step"] for e in evals], [e["heldout_gap"] for e in evals], "o-", ms=3, color=colour,
                label=name if r["seed"] == first_seed else None)
    ax.set_xlabel("fine-tuning step"), ax.set_ylabel("held-out MSE(v_student, v_teacher)")
    ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend()
    save_png(fig, path)


def demo_figure(path: Path, out: Path) -> None:
    evals = [r for r in read_jsonl(path) if "heldout_gap" in r]
    fig = figure(5, 3)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in evals], [r["heldout_gap"] for r in evals], "o-")
    ax.set_xlabel("distillation step"), ax.set_ylabel("held-out MSE(v_student, v_teacher)"), ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    save_png(fig, out / "demo_gap.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path)
    p.add_argument("--quality", type=Path)
    p.add_argument("--demo-metrics", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teacher:
        teacher_figures(args.teacher, args.out)
    if args.quality:
        quality_figures(args.quality, args.out)
    if args.demo_metrics:
        demo_figure(args.demo_metrics, args.out)


if __name__ == "__main__":
    main()
