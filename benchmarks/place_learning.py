"""Can a Wan DiT learn, at pure noise, to draw where its caption says? With and without
coordinate channels (CPU, ~4 minutes on 2 cores at the defaults).

    python benchmarks/place_learning.py [--steps 800] [--grid 16] [--seed 0]
        [--shift K [--pure-share P] [--pure-steps N]]

Toy task: each clip (1 frame of `--grid` x `--grid` tokens, patch 2 x 2, 4 channels) is 0 but for
a bright square filling one cell of a 3 x 3 grid over the frame; a one-word caption names the
cell (a fixed random embedding). The tiny Wan DiT (2 blocks, dim 64) is trained only at pure noise
(input: noise, target velocity: noise - clip), where the flow-matching optimum predicts the
caption's clip exactly (its loss: 0). A model that knows where each token is can get there; one
whose tokens know only their relative positions (RoPE) can place the square only by what it
learns from the frame's edges. Both variants train from the same initial weights (the coordinate
rows of the patch embedding start at 0), batches and noise; printed: the pure-noise loss on 64
held-out pairs as a share of the loss of predicting the caption-blind mean clip (1: nothing
learned of the caption's place; 0: the optimum), every 50 steps.

`--shift K` trains as the project's trainer does instead: each example's noise level drawn from
Wan's shifted schedule with shift K (sigma = K s / (1 + (K - 1) s), s ~ U[0, 1)), the input
x_sigma = (1 - sigma) clip + sigma noise, the timestep 1000 sigma; the evaluation stays at pure
noise. How much slower is the place learned when pure noise is a small share of the training?
With `--shift`, `--pure-share P` draws each example at pure noise with probability P instead, and
`--pure-steps N` trains the first N steps at pure noise only (a curriculum).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparge_jax.models import WAN_CONFIGS, WanModel
from sparge_jax.models.wan import with_coordinate_channels
from sparge_jax.sampling import shift_sigma
from train.schedule import noisy_latents, timesteps

CHANNELS, CELLS = 4, 3
EVERY = 50  # steps between held-out evaluations


def clips(regions: np.ndarray, grid: int) -> np.ndarray:
    """float32 `(n, 1, 2 grid, 2 grid, CHANNELS)`: 0 but for 1 in the cell `regions` `(n,)` (row-major
    index of a CELLS x CELLS grid) of each latent frame."""
    size = 2 * grid
    edges = np.linspace(0, size, CELLS + 1).astype(int)
    out = np.zeros((len(regions), 1, size, size, CHANNELS), np.float32)
    for i, r in enumerate(regions):
        row, col = divmod(int(r), CELLS)
        out[i, :, edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = 1.0
    return out


def train(model: WanModel, words: jax.Array, grid: int, steps: int, seed: int,
          shift: float | None = None, pure_share: float = 0.0, pure_steps: int = 0) -> list[float]:
    """Adam (lr 1e-3) on the flow-matching loss, batch 16, at pure noise (`shift` None) or at
    noise levels from the schedule shifted by `shift`, each example at pure noise instead with
    probability `pure_share` and every example of the first `pure_steps` steps; the held-out
    pure-noise loss share after every `EVERY` steps (and at step 0)."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    held_regions = np.arange(64) % CELLS ** 2
    held_x0 = jnp.asarray(clips(held_regions, grid))
    held_noise = jax.random.normal(jax.random.key(seed + 1), held_x0.shape)
    blind = float(jnp.mean((held_x0 - held_x0.mean(axis=0)) ** 2))

    def loss_fn(m, x0, noise, regions, sigma):
        v = m(noisy_latents(x0, noise, sigma), timesteps(sigma), words[regions][:, None], attention_mode="dense")[0]
        return jnp.mean((v - (noise - x0)) ** 2)

    @nnx.jit
    def step(m, opt, x0, noise, regions, sigma):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x0, noise, regions, sigma)
        opt.update(m, grads)
        return loss

    held = nnx.jit(functools.partial(loss_fn, x0=held_x0, noise=held_noise, regions=jnp.asarray(held_regions),
                                     sigma=jnp.ones(len(held_regions))))
    shares = [float(held(model)) / blind]
    for n in range(1, steps + 1):
        regions = rng.integers(0, CELLS ** 2, 16)
        key = jax.random.key(1000 * seed + n)
        noise = jax.random.normal(key, (16, 1, 2 * grid, 2 * grid, CHANNELS))
        if shift is None or n <= pure_steps:
            sigma = jnp.ones(16)
        else:
            pure = jax.random.uniform(jax.random.fold_in(key, 2), (16,)) < pure_share
            sigma = jnp.where(pure, 1.0, shift_sigma(jax.random.uniform(jax.random.fold_in(key, 1), (16,)), shift))
        step(model, optimizer, jnp.asarray(clips(regions, grid)), noise, jnp.asarray(regions), sigma)
        if n % EVERY == 0:
            shares.append(float(held(model)) / blind)
    return shares


def main(argv=None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--grid", type=int, default=16, help="tokens along each side of the frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=None,
                   help="train at noise levels from Wan's schedule with this shift (default: pure noise only)")
    p.add_argument("--pure-share", type=float, default=0.0, help="with --shift: share of examples at pure noise")
    p.add_argument("--pure-steps", type=int, default=0, help="with --shift: first steps at pure noise only")
    args = p.parse_args(argv)
    if args.steps < 1 or args.grid < CELLS:
        p.error(f"--steps must be at least 1 and --grid at least {CELLS}; got {args.steps}, {args.grid}")
    if args.shift is not None and not args.shift > 0:
        p.error(f"--shift must be positive; got {args.shift}")
    if not 0 <= args.pure_share <= 1 or args.pure_steps < 0:
        p.error(f"--pure-share must be in [0, 1] and --pure-steps at least 0; got {args.pure_share}, {args.pure_steps}")
    if args.shift is None and (args.pure_share or args.pure_steps):
        p.error("--pure-share and --pure-steps need --shift (without it every step is at pure noise)")
    config = WAN_CONFIGS["tiny"].replace(in_dim=CHANNELS, out_dim=CHANNELS)
    words = jax.random.normal(jax.random.key(args.seed + 2), (CELLS ** 2, config.text_dim))
    plain = WanModel(config, rngs=nnx.Rngs(args.seed))
    params, widened = with_coordinate_channels(nnx.to_pure_dict(nnx.state(plain, nnx.Param)), config)
    placed = WanModel(widened, rngs=nnx.Rngs(args.seed))
    state = nnx.state(placed, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(placed, state)
    results = {name: train(model, words, args.grid, args.steps, args.seed, args.shift, args.pure_share,
                           args.pure_steps)
               for name, model in (("relative positions only", plain), ("coordinate channels", placed))}
    trained_at = ["pure noise" if args.shift is None else f"noise levels of the schedule with shift {args.shift:g}"]
    if args.pure_share:
        trained_at.append(f"{args.pure_share:g} of them pure noise")
    if args.pure_steps:
        trained_at.append(f"after {args.pure_steps} steps at pure noise")
    print(f"Pure-noise loss on held-out pairs as a share of the caption-blind mean's ({args.grid} x {args.grid} "
          f"tokens, the tiny Wan DiT, {args.steps} Adam steps at {', '.join(trained_at)}):\n")
    print("| step | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for i in range(len(next(iter(results.values())))):
        print(f"| {i * EVERY} | " + " | ".join(f"{r[i]:.3f}" for r in results.values()) + " |")
    return results


if __name__ == "__main__":
    main()
