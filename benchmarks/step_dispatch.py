"""Does a jitted call return to Python before the device has run it? (GPU, ~1 minute)

    python benchmarks/step_dispatch.py [--size 8192] [--layers 24] [--state-mib 256]

A stand-in for a training step: a chain of `--layers` bf16 matmuls of `--size` (the forward and
backward), then the update of a float32 state of `--state-mib` MiB, skipped when the chain's
result is not finite (the training step's non-finite guard). Written six ways: with `lax.cond`;
with a select of new and old values (`jnp.where`); the chain as a `lax.scan`, then the cond; the
scanned chain alone; the cond compiled with XLA's command buffers off; the scanned chain and cond
compiled with while loops and conditionals in the command buffers. Per variant, the median over
calls (each waited for before the next) of the time a call took to return (its dispatch) and to
finish. A dispatch that takes most of the call means the host waited for the device inside it,
so a loop cannot prepare the next step while the device runs this one.

Measured on one H200 (2026-12-04, benchmarks/RESULTS.md): only a conditional after a while loop
blocks (0.98 of the call), and the command-buffer option removes that here; on the real
distillation and teacher steps the option changed nothing.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

# XLA's default command-buffer kinds, plus conditionals and while loops (a compile option takes
# the whole list: the relative "+WHILE" form is refused there)
WHILE_IN_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE"


def unrolled_chain(x, w, layers: int):
    for _ in range(layers):
        x = jnp.tanh(x @ w)
    return x


def scanned_chain(x, w, layers: int):
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=layers)[0]


def guarded_step(chain, skip: str, layers: int):
    """step(state, x, w) -> (state, total): the chain, then the state's update, skipped (`skip`:
    "cond" or "select") when the chain's result is not finite; skip None: no update."""

    def step(state, x, w):
        h = chain(x, w, layers)
        total = h.astype(jnp.float32).sum()
        if skip is None:
            return state, total
        finite = jnp.isfinite(total)
        update = lambda: state * 0.999 + h[0, 0].astype(jnp.float32)
        if skip == "cond":
            return jax.lax.cond(finite, update, lambda: state), total
        return jnp.where(finite, update(), state), total

    return step


def timed(fn, args, calls: int) -> tuple[float, float]:
    """(median dispatch seconds, median finish seconds) of `calls` calls, the state carried."""
    state, total = fn(*args)
    total.block_until_ready()
    dispatch, finish = [], []
    for _ in range(calls):
        tick = time.perf_counter()
        state, total = fn(state, *args[1:])
        dispatch.append(time.perf_counter() - tick)
        total.block_until_ready()
        finish.append(time.perf_counter() - tick)
    return float(np.median(dispatch)), float(np.median(finish))


def main(argv=None) -> list[tuple[str, float, float]]:
    """Print and return [(variant, dispatch seconds, finish seconds)]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--state-mib", type=int, default=256)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args(argv)
    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (args.size, args.size)) / np.sqrt(args.size)).astype(jnp.bfloat16)
    fresh_state = lambda: jnp.zeros((args.state_mib * 2**18,), jnp.float32)
    variants = [  # (name, chain, skip, compile options)
        ("lax.cond", unrolled_chain, "cond", None),
        ("select", unrolled_chain, "select", None),
        ("lax.cond after a scanned chain", scanned_chain, "cond", None),
        ("a scanned chain, no cond", scanned_chain, None, None),
        ("lax.cond, command buffers off", unrolled_chain, "cond", {"xla_gpu_enable_command_buffer": ""}),
        ("scanned chain + lax.cond, whiles in command buffers", scanned_chain, "cond",
         {"xla_gpu_enable_command_buffer": WHILE_IN_COMMAND_BUFFERS}),
    ]
    rows = []
    for name, chain, skip, options in variants:
        step = jax.jit(guarded_step(chain, skip, args.layers), donate_argnums=0)
        compiled = step.lower(fresh_state(), x, w).compile(compiler_options=options)
        rows.append((name, *timed(compiled, (fresh_state(), x, w), args.calls)))
    print(f"{jax.devices()[0].device_kind}; {args.layers} matmuls of {args.size}, state {args.state_mib} MiB")
    print("| variant | dispatch ms | finish ms | dispatch / finish |\n|---|---|---|---|")
    for name, dispatch, finish in rows:
        print(f"| {name} | {dispatch * 1e3:.2f} | {finish * 1e3:.2f} | {dispatch / finish:.2f} |")
    return rows


if __name__ == "__main__":
    main()
