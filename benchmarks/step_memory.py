"""The distillation step's memory as XLA plans it, from abstract params (nothing is allocated).

    python benchmarks/step_memory.py       # 14B, 480p, optim.trainable=self_attn, the option sets of VARIANTS
    python benchmarks/step_memory.py --preset t2v-1.3b --latent-shape 21 16 16 [key=value ...]

Builds the training step of `train.step` for a config (bf16, remat, scanned blocks, one clip per
step, 512 text tokens; `key=value` overrides on top), lowers it for `jax.ShapeDtypeStruct`s of the
train state, the teacher's own params and the batch (`train.step.TrainStepCall.lower`), compiles it
for this machine's backend and prints `compiled.memory_analysis()`: arguments (state, teacher,
batch), outputs (aliased to the donated state), temporaries (everything the step allocates
besides). About 20 s per compile at 14B on 2 CPU cores.

On the CPU no fused attention kernel runs: XLA's dense attention would hold the (heads, tokens,
tokens) logits (86 GB at 480p) and the block-sparse "xla" backend float32 copies of q, k, v.
`--attention stand-in` (the default on a CPU) replaces both by `fused_stand_in`, which keeps what
the GPU kernels keep (the output, and q, k, v, output and log-sum-exp for the backward) and
computes wrong values. The per-block working set of the CPU program is still larger than a
GPU's (XLA fuses less there); the other terms (state, teacher, saved block inputs, stacked or
copied params) do not depend on the backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from unittest import mock

import jax
import jax.numpy as jnp

from sparge_jax.dtypes import DTYPES
from train.config import TrainConfig, load_config
from train.model import param_dtypes, select, teacher_copy
from train.loop import training_layout
from train.optimizer import make_optimizer
from train.sharding import make_mesh, param_shardings
from train.step import TrainState, batch_shardings, jit_train_step, make_train_step, state_shardings

GIB = 2**30
TEXT_TOKENS = 512
BASE = ["model.overrides={}", "model.overrides.scan_layers=true", "model.compute_dtype=bfloat16", "model.remat=true",
        "data.batch_size=1", "mesh.data=1", "mesh.fsdp=1", "mesh.context=1", "mesh.tensor=1"]
# (name, overrides) of the default run: the memory options of docs/training.md, one after another.
VARIANTS = (("default", []), ("optim.mu_dtype=bfloat16", ["optim.mu_dtype=bfloat16"]),
            ("+ model.remat_input_dtype=bfloat16", ["optim.mu_dtype=bfloat16", "model.remat_input_dtype=bfloat16"]))


@jax.custom_vjp
def fused_stand_in(q, k, v):
    """Memory stand-in of a fused attention kernel (cuDNN, the block-sparse kernels), wrong values:
    q `(batch, seq_q, heads, d)`, k, v `(batch, seq_k, heads, d)` -> `(batch, seq_q, heads, d)`,
    keeping q, k, v, the output and a float32 log-sum-exp `(batch, heads, seq_q)` for the backward."""
    return _stand_in_fwd(q, k, v)[0]


def _stand_in_fwd(q, k, v):
    mean = lambda t: jnp.mean(t.astype(jnp.float32), axis=1, keepdims=True)  # noqa: E731
    out = (q.astype(jnp.float32) * mean(k) + mean(v)).astype(q.dtype)
    lse = jnp.sum(q.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    return out, (q, k, v, out, lse)


def _stand_in_bwd(residuals, d_out):
    q, k, v, out, lse = residuals
    d_out = d_out.astype(jnp.float32) + 0 * lse.transpose(0, 2, 1)[..., None] + 0 * out.astype(jnp.float32)
    dq = d_out * jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True)
    dk = jnp.sum(d_out * q.astype(jnp.float32), axis=1, keepdims=True) / k.shape[1]
    dv = jnp.sum(d_out, axis=1, keepdims=True) / v.shape[1]
    return dq.astype(q.dtype), jnp.broadcast_to(dk, k.shape).astype(k.dtype), jnp.broadcast_to(dv, v.shape).astype(v.dtype)


fused_stand_in.defvjp(_stand_in_fwd, _stand_in_bwd)


@contextlib.contextmanager
def attention_stand_in():
    """Within it, dense and block-sparse attention run `fused_stand_in` (traced programs only)."""
    dense = lambda q, k, v, *, sm_scale=None: fused_stand_in(q, k, v)  # noqa: E731
    sparse = lambda q, k, v, index, *args, **kwargs: fused_stand_in(q, k, v)  # noqa: E731
    with (mock.patch("sparge_jax.nn.dense_attention", dense), mock.patch("sparge_jax.models.wan.dense_attention", dense),
          mock.patch("sparge_jax.attention.block_sparse_attention", sparse)):
        yield


def step_config(preset: str, latent_shape, overrides=()) -> TrainConfig:
    """The config `compiled_memory` measures: `BASE` for `preset` and `latent_shape`, then `overrides`."""
    return load_config(None, [f"model.preset={preset}", *BASE, f"data.synthetic_latent_shape={json.dumps(list(latent_shape))}",
                              f"data.synthetic_text_len={TEXT_TOKENS}", *overrides])


def abstract_inputs(cfg: TrainConfig):
    """(model parts, optimizer, trainable labels, (state, teacher's own params, batch)) of `cfg`'s
    training step, the last three as `jax.ShapeDtypeStruct`s: the train state as `train.loop`
    holds it (scanned blocks stacked, `parts.stacks`), one micro-batch of `data.batch_size` clips
    of `data.synthetic_latent_shape` with text of `data.synthetic_text_len` (`data.grad_accum` of
    them)."""
    parts, like, labels, stacks = training_layout(cfg)
    parts, labels = parts._replace(stacks=stacks), stacks.stack_labels(labels)
    compute_dtype = DTYPES[cfg.model.compute_dtype]
    like = jax.eval_shape(stacks.stack, like)
    params = jax.tree.map(lambda x, dtype: jax.ShapeDtypeStruct(x.shape, dtype), like, param_dtypes(labels, compute_dtype))
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                       jax.eval_shape(optimizer.init, select(params, labels, "train")),
                       jax.ShapeDtypeStruct((2,), jnp.uint32))
    teacher = jax.eval_shape(lambda p: teacher_copy(p, labels, compute_dtype), params)
    d, c = cfg.data, parts.config
    micro = (d.grad_accum, d.batch_size // d.grad_accum)
    batch = {"latents": jax.ShapeDtypeStruct((*micro, *d.synthetic_latent_shape, c.in_dim), jnp.float32),
             "context": jax.ShapeDtypeStruct((*micro, d.synthetic_text_len, c.text_dim), jnp.float32)}
    return parts, optimizer, labels, (state, teacher, batch)


def lower_step(cfg: TrainConfig) -> jax.stages.Lowered:
    """`cfg`'s training step (`train.step.make_train_step`, jitted as `train.loop` runs it on
    this machine's mesh) lowered for `abstract_inputs`."""
    parts, optimizer, labels, (state, teacher, batch) = abstract_inputs(cfg)
    mesh = make_mesh(cfg.mesh)
    # per-layer shardings (they depend on paths and shapes only) in the state's layout
    per_layer = jax.eval_shape(parts.stacks.unstack, state.params)
    shardings = parts.stacks.stack_shardings(param_shardings(per_layer, mesh))
    step = jit_train_step(make_train_step(parts, optimizer, cfg),
                          state_shardings(optimizer, state.params, shardings, labels, mesh), shardings,
                          batch_shardings(mesh, {name: x.ndim - 2 for name, x in batch.items()}), mesh,
                          cfg.compiler_options)
    return step.lower(state, teacher, batch)


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compiled_memory(cfg: TrainConfig) -> dict[str, int]:
    """Bytes of `memory_analysis()` of `cfg`'s compiled training step (`lower_step`):
    "arguments", "outputs", "aliased" (outputs in donated arguments), "temp", and "total" =
    arguments + outputs - aliased + temp; "state" and "teacher": the train state's and the
    teacher's own params' share of the arguments."""
    _, _, _, (state, teacher, _) = abstract_inputs(cfg)
    memory = lower_step(cfg).compile().memory_analysis()
    out = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
           "aliased": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
           "state": nbytes(state), "teacher": nbytes(teacher)}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out


def main(argv=None) -> list[tuple[str, dict[str, int]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="t2v-14b")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"))
    parser.add_argument("--trainable", default="self_attn", help="optim.trainable ('' trains every param)")
    parser.add_argument("--attention", choices=("stand-in", "real"), default=None,
                        help="default: the stand-in on a CPU, the library's kernels elsewhere")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides; given, they replace VARIANTS")
    args = parser.parse_args(argv)
    stand_in = (args.attention or ("stand-in" if jax.default_backend() == "cpu" else "real")) == "stand-in"
    trainable = [f"optim.trainable={args.trainable}"] if args.trainable else []
    variants = [(" ".join(args.overrides), args.overrides)] if args.overrides else VARIANTS
    print(f"{args.preset}, latents {args.latent_shape}, {jax.devices()[0].device_kind}, attention "
          f"{'stand-in' if stand_in else 'real'} (GiB)")
    print(f"{'variant':36} {'arguments':>9} {'state':>7} {'teacher':>7} {'temp':>7} {'total':>7}")
    results = []
    for name, overrides in variants:
        cfg = step_config(args.preset, args.latent_shape, [*trainable, *overrides])
        with attention_stand_in() if stand_in else contextlib.nullcontext():
            memory = compiled_memory(cfg)
        results.append((name, memory))
        print(f"{name:36} " + " ".join(f"{memory[k] / GIB:>{w}.2f}" for k, w in
                                      (("arguments", 9), ("state", 7), ("teacher", 7), ("temp", 7), ("total", 7))))
    return results


if __name__ == "__main__":
    main()
