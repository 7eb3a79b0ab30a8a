"""Layer-level check of the mask rules on the miniature teacher's real q, k, v (CPU is fine).

    python benchmarks/quality_layers.py [--clips 1] [--sigma 0.5] [--targets 0.8 0.95]
        [--methods spargeattn svg radial svg2]

Captures every layer's self-attention q, k, v of the dense teacher (study size, 4096 tokens)
on held-out clips, calibrates each rule to the target block sparsity on them (bisection of
its knob, as benchmarks/quality.py does; the hybrid with several Top-k shares of the kept-
block budget: share 0 is Top-p alone, 1 Top-k alone), and prints the relative L2 error of
the masked attention output against dense attention, per layer and on average. No sampling:
this isolates the mask rule from error accumulation over denoising steps.

`--methods` adds the peer providers of benchmarks/quality.py's Table 1 (its `METHODS` settings
and knob ranges): each knob bisected to the target on the mean skipped fraction over the layers
(`sparge_jax.tools.capture.skipped_fraction`, the layer's own PRNG key as `WanModel` draws),
the error that of the library's own sparse attention for that method
(`sparge_jax.methods.method_attention`; SVG2 from a fresh clustering, `init_iters`, as at a
sampler's first step). A provider whose sparsest knob falls short of the target is reported at
that knob, marked `*`. For SVG2 a second line shows its selection at token level: the
sparsity of the linked token pairs (cluster pairs `svg2_clusters` keeps; our fixed-size blocks
keep every block pair that holds one, a superset) and the error of attention over exactly those
pairs, which is what upstream's variable-size blocks compute.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocks import num_blocks
from sparge_jax.masks.providers import svg2_start
from sparge_jax.masks.sparge import predict_mask
from sparge_jax.masks.svg2 import svg2_clusters
from sparge_jax.methods import method_attention
from sparge_jax.tools.capture import skipped_fraction, token_grid
from sparge_jax.tools.compare import dense_attention_fp32, rel_l2
from train.config import load_config
from train.generate import capture_layers
from train.model import init_on_device, wan_config
from train.procedural import ProceduralClips, clip_spec

from quality import METHODS, TEACHER, TEACHER_CONFIG, bisect_knob, with_sparse  # noqa: E402 (benchmarks/ on the path)

PROVIDERS = [name for name in METHODS if name not in ("topk", "topp", "hybrid")]


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
    p.add_argument("--shares", type=float, nargs="*", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--bisect", type=int, default=10)
    p.add_argument("--methods", nargs="*", default=[], choices=PROVIDERS,
                   help="peer providers to compare too (default none)")
    args = p.parse_args()
    cfg = load_config(TEACHER_CONFIG, [f"model.weights={TEACHER}"])
    parts, params = init_on_device(cfg.model)
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
            knob, achieved, _ = bisect_knob(lambda x: sparsity(rule(share, x, target)), 0.001, 1.0, target,
                                            args.bisect)
            best = rule(share, knob, target)
            errors = [rel_l2(masked_attention(q, k, v, predict_mask(q, k, best), bq, bk), d)
                      for (q, k, v), d in zip(layers, dense)]
            print(f"{target:>6.2f} {share:>5.1f} {achieved:>8.3f} {np.mean(errors):>11.3f}  "
                  + " ".join(f"{e:.3f}" for e in errors), flush=True)
        for name in args.methods:
            provider_row(name, target, cfg, layers, dense, token_grid(spec.latent_shape[:3], config.patch_size),
                         args.bisect)


def provider_row(name: str, target: float, cfg, layers, dense, grid, bisect: int) -> None:
    """Print one peer provider's row: its knob bisected to `target` on the layers' mean skipped
    fraction, then the per-layer relative L2 error of its sparse attention against dense."""
    build, _, (lo, hi) = METHODS[name]
    config_of = lambda x: wan_config(with_sparse(cfg.model, build(x, target))).sparse
    keys = [jax.random.key(layer) for layer in range(len(layers))]  # as WanModel draws per layer

    def sparsity(config) -> float:
        return float(np.mean([skipped_fraction(q, k, v, config, grid, layer=i, key=key)
                              for i, ((q, k, v), key) in enumerate(zip(layers, keys))]))

    knob, achieved, _ = bisect_knob(lambda x: sparsity(config_of(x)), lo, hi, target, bisect)
    config = config_of(knob)
    errors = [rel_l2(method_attention(q, k, v, config=config, grid=grid, key=key, layer=i)[0].astype(jnp.float32), d)
              for i, ((q, k, v), key, d) in enumerate(zip(layers, keys, dense))]
    below = "*" if achieved < target else " "
    print(f"{target:>6.2f} {name:>10} {achieved:>7.3f}{below} {np.mean(errors):>11.3f}  "
          + " ".join(f"{e:.3f}" for e in errors) + f"  (knob {knob:.4g})", flush=True)
    if name == "svg2":
        token = [svg2_token_level(q, k, v, config.method, key) for (q, k, v), key in zip(layers, keys)]
        errors = [rel_l2(out, d) for (_, out), d in zip(token, dense)]
        pairs = float(np.mean([s for s, _ in token]))
        print(f"{target:>6.2f} {'svg2 exact':>10} {pairs:>8.3f} {np.mean(errors):>11.3f}  "
              + " ".join(f"{e:.3f}" for e in errors) + f"  (token pairs; linked share of the kept blocks "
              f"{(1 - pairs) / (1 - achieved):.2f})", flush=True)


def svg2_token_level(q, k, v, method, key) -> tuple[float, jax.Array]:
    """(fraction of token pairs SVG2 does not link, fp32 attention over exactly the linked pairs
    `(batch, seq, heads, d)`) from a fresh clustering, as `method_attention` starts with `key`."""
    centroids, iters = svg2_start(q, k, method, None, key)
    q_labels, k_labels, links, _ = svg2_clusters(q, k, q_clusters=method.q_clusters, k_clusters=method.k_clusters,
                                                 topp=method.topp, min_k_ratio=method.min_k_ratio, iters=iters,
                                                 centroids=centroids, upstream=method.upstream_kmeans)
    rows = jnp.take_along_axis(links, q_labels[..., :, None], axis=2)  # (b, h, seq_q, k_clusters)
    linked = jnp.take_along_axis(rows, jnp.broadcast_to(k_labels[..., None, :], rows.shape[:3] + k_labels.shape[-1:]),
                                 axis=3)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(linked, s, -jnp.inf), axis=-1)
    return 1.0 - float(jnp.mean(linked)), jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))


if __name__ == "__main__":
    main()
