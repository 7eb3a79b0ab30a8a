"""Layer-level check of the mask rules on the miniature teacher's real q, k, v (CPU is fine).

    python benchmarks/quality_layers.py [--clips 1] [--sigma 0.5] [--targets 0.8 0.95]

Captures every layer's self-attention q, k, v of the dense teacher (study size, 4096 tokens)
on held-out clips, calibrates each rule to the target block sparsity on them (bisection of
its knob, as benchmarks/quality.py does; the hybrid with several Top-k shares of the kept-
block budget: share 0 is Top-p alone, 1 Top-k alone), and prints the relative L2 error of
the masked attention output against dense attention, per layer and on average. No sampling:
this isolates the mask rule from error accumulation over denoising steps.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocks import num_blocks
from sparge_jax.tools.compare import dense_attention_fp32, rel_l2
from sparge_jax.masks.sparge import predict_mask
from train.config import load_config
from train.generate import capture_layers
from train.model import abstract_model, init_params, wan_config
from train.procedural import ProceduralClips, clip_spec

from quality import TEACHER, TEACHER_CONFIG  # noqa: E402 (benchmarks/ on the path)


def masked_attention(q, k, v, mask, block_q: int, block_k: int):
    """fp32 softmax attention restricted to the kept blocks of `mask` `(b, h, nq, nk)`."""
    seq = q.shape[1]
    token_mask = jnp.repeat(jnp.repeat(mask, block_q, axis=2), block_k, axis=3)[:, :, :seq, :seq]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(token_mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.95])
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--bisect", type=int, default=10)
    args = p.parse_args()
    cfg = load_config(TEACHER_CONFIG, [f"model.weights={TEACHER}"])
    parts, like = abstract_model(cfg.model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    parts, params = init_params(cfg.model, 0, jax.tree.map(lambda _: device, like))
    config = wan_config(cfg.model)
    spec = clip_spec(cfg.data.procedural, config.text_dim, config.in_dim)
    batch = ProceduralClips(spec, args.clips, seed=3, split="heldout").read(np.arange(args.clips))
    layers = list(capture_layers(parts, params, batch, args.sigma).values())
    dense = [dense_attention_fp32(q, k, v) for q, k, v in layers]
    base = config.sparse
    bq, bk = base.kernel.block_q, base.kernel.block_k
    nq, nk = num_blocks(layers[0][0].shape[1], bq), num_blocks(layers[0][1].shape[1], bk)

    def rule(share: float, knob: float, target: float):
        budget = 1.0 - target
        if share == 0.0:
            return base.replace(rule="topp", topp=knob)
        if share == 1.0:
            return base.replace(rule="topk", topk=knob)
        return base.replace(rule="hybrid", topk=max(share * budget, 1e-3), topp=knob)

    def sparsity(sparse) -> float:
        return 1.0 - float(np.mean([np.mean(np.asarray(predict_mask(q, k, sparse))[..., :nq, :nk])
                                    for q, k, _ in layers]))

    print(f"{'target':>6} {'share':>5} {'achieved':>8} {'mean rel L2':>11}  per layer")
    for target in args.targets:
        for share in args.shares:
            lo, hi = 0.001, 1.0
            best = rule(share, lo, target)
            for _ in range(args.bisect):
                mid = (lo + hi) / 2
                if sparsity(rule(share, mid, target)) >= target:
                    lo, best = mid, rule(share, mid, target)
                else:
                    hi = mid
            errors = [rel_l2(masked_attention(q, k, v, predict_mask(q, k, best), bq, bk), d)
                      for (q, k, v), d in zip(layers, dense)]
            print(f"{target:>6.2f} {share:>5.1f} {sparsity(best):>8.3f} {np.mean(errors):>11.3f}  "
                  + " ".join(f"{e:.3f}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
