"""Distillation step time, model FLOP utilisation (MFU) and memory of a Wan2.1-shaped model on the visible GPUs.

    python benchmarks/train_step.py [--preset t2v-1.3b] [--resolution 480p] [--steps 5] [--keep 0.1]
        [--scan] [--no-triton-gemm] [--trace-compile DIR] [--peak-tflops 989]
        [key=value overrides for train.config ...]
    python benchmarks/train_step.py --small   # the tiny preset on a few tokens (CPU; tests the code paths)

Random weights and synthetic latents (81 frames: 21x60x104 at 480p, 32760 tokens; 21x90x160 at
720p) with 512-token text embeddings; one example per device, parameters/optimizer state
sharded over `fsdp` across all devices; bf16 compute, remat on. The student's self-attention
keeps --keep of the k blocks of every q-block row (Sparge2 Top-k), so its attention FLOPs are
known. --scan: `model.overrides.scan_layers=true`. --no-triton-gemm: the step compiled with
`sparge_jax.compile_options.TRITON_GEMM_OFF` (`compiler_options`: cuBLASLt GEMMs instead of
Triton's, so XLA can fuse the FFN's bias + GELU into the up-projection; the backward's GEMMs
change too); run with and without it to compare (no effect on CPU). --trace-compile DIR: the run
traced by `jax.profiler` (Python frames off), then the host's costliest event names printed
(`step_profile.host_event_totals`): XLA's passes, LLVM and ptxas, where the compile's time goes.
Prints per-step time, tokens/s, the FLOPs of one step and the MFU of the steady steps (the second
to the one before the last: on a GPU the last step's step_time comes out short, for a reason not
found yet), the
teacher's own params against the shared frozen ones, and the peak device memory.

FLOPs (benchmarks/step_profile.py `wan_forward_flops`, matmuls only, per example): teacher
forward (dense attention) + student forward (attention at its kept fraction) + recompute (the
student forward again, with remat) + backward (2x the student forward). MFU = FLOPs per step /
step time / (devices x --peak-tflops); --peak-tflops defaults to the dense bf16 peak of an
H100/H200 (989), and is needed on other devices.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import jax
from jax.profiler import ProfileData
from step_profile import host_event_totals, trace_file, wan_forward_flops

from sparge_jax.compile_options import TRITON_GEMM_OFF
from train.config import load_config
from train.loop import train
from train.metrics import tokens_per_example
from train.model import wan_config

RESOLUTIONS = {"480p": [21, 60, 104], "720p": [21, 90, 160]}
SMALL_LATENTS = [2, 8, 12]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak


def step_flops(config, latent_shape, text_len: int, keep: float, remat: bool) -> dict[str, float]:
    """FLOPs of one distillation step for one example, by part."""
    grid = tuple(n // p for n, p in zip(latent_shape, config.patch_size))
    k_blocks = math.ceil(math.prod(grid) / config.sparse.kernel.block_k)
    kept = min(math.ceil(keep * k_blocks), k_blocks) / k_blocks  # Top-k with "ceil" counting
    total = lambda parts: parts["attention"] + parts["other"]
    teacher = total(wan_forward_flops(config, grid, text_len))
    student = total(wan_forward_flops(config, grid, text_len, attention_keep=kept))
    return {"teacher forward": teacher, "student forward": student, "recompute": student if remat else 0.0,
            "backward": 2 * student}


def print_host_events(directory: str, top: int = 40) -> None:
    """The costliest host event names of the trace saved under `directory` (`host_event_totals`)."""
    path = trace_file(directory)
    print(f"host events of {path} (seconds summed per name, Python frames left out; nested events overlap):")
    for name, seconds, count in host_event_totals(ProfileData.from_file(path), top):
        print(f"{seconds:9.2f} s  x{count:<6} {name[:110]}")


def main(argv=None) -> dict:
    """Run the benchmark; returns {"step_s": steady step seconds, "flops": per-step FLOPs by part,
    "mfu": MFU or None, "teacher_bytes": own, "shared_bytes": shared, "compiler_options": the step's}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("t2v-1.3b", "t2v-14b"), default="t2v-1.3b")
    parser.add_argument("--resolution", choices=tuple(RESOLUTIONS), default="480p")
    parser.add_argument("--small", action="store_true", help="tiny preset, few tokens, float32 (CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--keep", type=float, default=0.1, help="student's kept fraction of k blocks per row")
    parser.add_argument("--scan", action="store_true", help="scan the DiT blocks (WanConfig.scan_layers)")
    parser.add_argument("--no-triton-gemm", action="store_true",
                        help="compile the step with Triton GEMMs off (compiler_options=TRITON_GEMM_OFF)")
    parser.add_argument("--trace-compile", metavar="DIR",
                        help="trace the run with jax.profiler into DIR and print the host's costliest events "
                             "(where the compile's time goes; use with --steps 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default: by device)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    devices = jax.devices()
    shape = SMALL_LATENTS if args.small else RESOLUTIONS[args.resolution]
    text_len = 5 if args.small else 512
    sparse = {"method": {"kind": "sparge2", "rule": "topk", "topk": args.keep}}
    metrics = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    options = [f"compiler_options={json.dumps(TRITON_GEMM_OFF)}"] if args.no_triton_gemm else []
    cfg = load_config(None, [
        f"model.preset={'tiny' if args.small else args.preset}",
        f"model.overrides={json.dumps({'sparse': sparse, 'scan_layers': args.scan})}",
        f"model.compute_dtype={'float32' if args.small else 'bfloat16'}", "model.remat=true",
        f"data.synthetic_latent_shape={json.dumps(shape)}", f"data.synthetic_text_len={text_len}",
        f"data.batch_size={len(devices)}", f"data.synthetic_examples={4 * len(devices)}",
        "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", f"steps={args.steps}", "optim.warmup_steps=1",
        f"metrics_path={metrics}", *options, *args.overrides,
    ])
    config = wan_config(cfg.model)
    print(f"devices: {len(devices)} x {devices[0].device_kind}; global batch {cfg.data.batch_size}; "
          f"{cfg.model.preset}, latents {shape}, student keeps {args.keep:.0%}, scan_layers {config.scan_layers}, "
          f"residual {cfg.model.residual_dtype}, "
          f"trainable {cfg.optim.trainable or 'all'}, compiler options {cfg.compiler_options or 'none'}")
    if args.trace_compile:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # Python frames slow a 1-minute compile several-fold
        with jax.profiler.trace(args.trace_compile, profiler_options=options):
            result = train(cfg, progress=False)
        print_host_events(args.trace_compile)
    else:
        result = train(cfg, progress=False)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(f"{'step':>4} {'loss':>10} {'step_s':>8} {'tokens/s':>10}")
    for r in records:
        print(f"{r['step']:>4} {r['loss']:>10.5f} {r['step_time']:>8.3f} {r['tokens_per_s']:>10.0f}")
    # On the H200 the last step's step_time came out short (0.62 s against 1.48 s at 1.3B 480p, faster
    # than the card's peak allows; the cause is not found): left out when other steps remain.
    steady = [r["step_time"] for r in records[1:-1]] or [r["step_time"] for r in records[1:]] or [records[0]["step_time"]]
    step_s = sum(steady) / len(steady)
    tokens = cfg.data.batch_size * tokens_per_example(shape, config.patch_size)
    print(f"first step {records[0]['step_time']:.1f} s, of which compiling the step {records[0]['compile_s']:.1f} s "
          f"(tracing and lowering {records[0]['lower_s']:.1f} s); "
          f"steady step {step_s:.3f} s "
          f"({tokens / step_s:.0f} tokens/s over {len(devices)} devices)")

    flops = {name: value * cfg.data.batch_size
             for name, value in step_flops(config, shape, text_len, args.keep, cfg.model.remat).items()}
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in devices[0].device_kind), None)
    mfu = None if peak is None else sum(flops.values()) / step_s / (len(devices) * peak * 1e12)
    print("FLOPs per step: " + ", ".join(f"{name} {value:.3g}" for name, value in flops.items())
          + f"; total {sum(flops.values()):.3g}")
    print(f"MFU {mfu:.1%} (peak {peak:g} TFLOP/s per device)" if mfu is not None
          else "MFU: pass --peak-tflops for this device")

    pairs = list(zip(jax.tree.leaves(result.teacher), jax.tree.leaves(result.state.params)))
    teacher_bytes = sum(mine.nbytes for mine, student in pairs if mine is not student)
    shared_bytes = sum(student.nbytes for mine, student in pairs if mine is student)
    print(f"teacher's own params {teacher_bytes / 2**20:.1f} MiB; frozen params shared with the student "
          f"{shared_bytes / 2**20:.1f} MiB")
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        peak_bytes = stats.get("peak_bytes_in_use")
        if peak_bytes is not None:
            print(f"{device}: peak memory {peak_bytes / 2**30:.2f} GiB of {stats.get('bytes_limit', 0) / 2**30:.1f} GiB")
    print(f"final param checksum {result.checksum:.6g}")
    return {"step_s": step_s, "flops": flops, "mfu": mfu, "teacher_bytes": teacher_bytes, "shared_bytes": shared_bytes,
            "compiler_options": cfg.compiler_options}


if __name__ == "__main__":
    main()
