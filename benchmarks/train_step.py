"""Distillation step time and memory of a Wan2.1-1.3B-shaped model at 480p on the visible GPUs.

    python benchmarks/train_step.py [--steps 5] [key=value overrides for train.config ...]

Random weights and synthetic latents `(21, 60, 104, 16)` (81 frames at 480p: 32760 tokens)
with 512-token text embeddings; one example per device, parameters/optimizer state sharded
over `fsdp` across all devices. Prints per-step time, tokens/s and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax

from train.config import load_config
from train.loop import train

SHAPE_480P = [21, 60, 104]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    devices = jax.devices()
    metrics = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    cfg = load_config(None, [
        "model.preset=t2v-1.3b", "model.overrides={}", "model.compute_dtype=bfloat16", "model.remat=true",
        f"data.synthetic_latent_shape={json.dumps(SHAPE_480P)}", "data.synthetic_text_len=512",
        f"data.batch_size={len(devices)}", f"data.synthetic_examples={4 * len(devices)}",
        "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", f"steps={args.steps}", "optim.warmup_steps=1",
        f"metrics_path={metrics}", *args.overrides,
    ])
    print(f"devices: {len(devices)} x {devices[0].device_kind}; global batch {cfg.data.batch_size}; "
          f"sparse {cfg.model.overrides.get('sparse', 'preset default')}")
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(f"{'step':>4} {'loss':>10} {'step_s':>8} {'tokens/s':>10}")
    for r in records:
        print(f"{r['step']:>4} {r['loss']:>10.5f} {r['step_time']:>8.3f} {r['tokens_per_s']:>10.0f}")
    steady = [r["step_time"] for r in records[1:]] or [records[0]["step_time"]]
    print(f"first step (with compile) {records[0]['step_time']:.1f} s; steady step {sum(steady) / len(steady):.3f} s "
          f"({records[-1]['tokens_per_s']:.0f} tokens/s over {len(devices)} devices)")
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        if peak is not None:
            print(f"{device}: peak memory {peak / 2**30:.2f} GiB of {stats.get('bytes_limit', 0) / 2**30:.1f} GiB")
    print(f"final param checksum {result.checksum:.6g}")


if __name__ == "__main__":
    main()
