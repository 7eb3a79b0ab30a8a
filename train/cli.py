"""Command line: `python -m train [--config FILE] [--resume] [key.sub=value ...]`.

With no --config it runs the demo (`configs/demo.json`): the shipped miniature teacher
distilled into a 90-95 % block-sparse student on procedural clips, on the CPU in minutes."""

from __future__ import annotations

import argparse
import sys
import traceback

import jax

from sparge_jax.cli import HelpFormatter
from train.config import DEMO_CONFIG, load_config
from train.distributed import initialize
from train.loop import train
from train.shutdown import StopRequested


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparge-train",
        description="Velocity distillation of a sparse-attention Wan student from its dense teacher.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", default=str(DEMO_CONFIG),
                        help="JSON config (the demo, configs/demo.json, by default; configs/tiny.json is the smallest)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    parser.add_argument("--coordinator",
                        help="host:port of process 0 (multi-process runs; default: $SPARGE_COORDINATOR_ADDRESS, "
                             "else a single process)")
    parser.add_argument("--num-processes", type=int, help="number of processes (default: $SPARGE_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="this process's index (default: $SPARGE_PROCESS_ID)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--allow-schedule-change", action="store_true",
                        help="with --resume: accept a changed `steps` or `optim` section (changes the LR schedule)")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback of an error")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-4 steps=100")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)


def main(argv=None) -> None:
    """Exit status: 0 done; 1 an error (one line on stderr; --traceback for all of it); 2 bad
    arguments or config; 128 + signal number when stopped by SIGTERM / Ctrl-C (state saved)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"sparge-train: config error: {err}", file=sys.stderr)
        sys.exit(2)
    initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress,
                       allow_schedule_change=args.allow_schedule_change)
    except StopRequested as stop:
        print(f"sparge-train: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("sparge-train: interrupted (no new checkpoint written; saves in flight were finished)", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if args.traceback:
            traceback.print_exc()
        print(f"sparge-train: error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    if not result.metrics:
        print(f"{prefix}nothing to do: the checkpoint is already at step {cfg.steps}")
        return
    done = int(result.metrics["step"])
    if done < cfg.steps:
        print(f"{prefix}time_limit_s ({cfg.time_limit_s:g} s) spent: stopped after step {done} of {cfg.steps}"
              f"{' (checkpoint saved; continue with --resume)' if cfg.checkpoint.dir else ''}")
    print(f"{prefix}final loss {result.metrics['loss']:.9g} after {done} steps; param checksum {result.checksum:.9g}")
    if cfg.report_path is not None and jax.process_index() == 0:
        from train.report import distillation_report

        r = distillation_report(cfg, result, picture=cfg.report_path)
        guided = (f"; with guidance {cfg.eval_guidance:g}: {r['guided_psnr_before_db']:.2f} dB -> "
                  f"{r['guided_psnr_after_db']:.2f} dB" if "guided_psnr_before_db" in r else "")
        weights = "after: the EMA of the trained weights (optim.ema_decay)\n" if r["after_weights"] == "ema" else ""
        print(f"achieved block sparsity {100 * r['block_sparsity']:.1f} %\n{weights}"
              f"held-out student-teacher velocity gap (MSE) {r['gap_before']:.4g} -> {r['gap_after']:.4g} "
              f"({100 * (1 - r['gap_after'] / r['gap_before']):.0f} % lower)\n"
              f"  unconditional branch (zero caption) {r['uncond_gap_before']:.4g} -> {r['uncond_gap_after']:.4g}; "
              f"guided velocity at guidance {cfg.eval_guidance:g} {r['guided_gap_before']:.4g} -> "
              f"{r['guided_gap_after']:.4g}\n"
              f"sample PSNR vs dense {r['psnr_before_db']:.2f} dB -> {r['psnr_after_db']:.2f} dB{guided}\n"
              f"samples: {r['picture']}")
