"""umT5-XXL encode of one 512-token prompt: sparge_jax's `UMT5Encoder` next to transformers'
`UMT5EncoderModel` in torch, on the same device, in the same run, with the same random weights.

Full size (Wan2.1's text encoder: 24 layers, d_model 4096, 64 heads, d_ff 10240, vocab 256384,
~5.7B parameters), bf16 params and compute, batch 1, 512 token ids (all real tokens). The JAX
weights are drawn at random (kernels ~ N(0, 1/fan_in), norm scales 1, embeddings and position
tables ~ N(0, 0.25)) and handed to torch through DLPack, so both encode the same numbers: the
relative difference of the two outputs is printed as a sanity check. In bf16 it is large with
these random weights (unscaled T5 logits of std ~8 make near one-hot softmaxes that rounding
flips, our residual stream being float32 and transformers' bf16); `--dtype float32` compares the
two at full precision (torch matmuls without TF32).
Times: median of --reps calls after warm-up (JAX: one jitted call, `benchmarks/bench_timing.py`;
torch: `torch.inference_mode`, synchronized with `torch.cuda.synchronize`), in --rounds rounds
that alternate the two encoders (torch's median moved between 24 and 35 ms from one run to the
next on the H200); the table gives the median over rounds and their range. The table is printed
last. `--small` runs a 2-layer, d_model 64 encoder on the CPU in float32 in seconds (the torch
column is left out when torch or transformers is missing).

On the GPU machine (torch and JAX there, transformers and tokenizers not), carry the wheels of
transformers and its dependencies, downloaded on a Linux x86_64 machine with the device's Python
(`python3 --version` there; checked here with 3.12: 31 wheels, 44 MB, 29 MB without numpy, which
the device has and which transformers' requirement leaves alone):

    pip download -d umt5_wheels transformers==5.24.0 && rm umt5_wheels/numpy-*
    # on the device, from the repository root:
    python3 -m pip install --no-index --find-links umt5_wheels transformers==5.24.0
    PYTHONPATH=. python3 benchmarks/umt5_speed.py

(torch and JAX share the GPU: without XLA_PYTHON_CLIENT_PREALLOCATE=false JAX takes 75% of its
memory at start; the script sets it itself when it is unset.)

Usage: python benchmarks/umt5_speed.py [--small] [--reps 10] [--rounds 3] [--seq 512] [--dtype bfloat16|float32] [--profile]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_timing import median_time  # noqa: E402
from step_profile import breakdown_table, op_breakdown  # noqa: E402
from convert.keys import LINEAR  # noqa: E402
from convert.original import flatten_params  # noqa: E402
from convert.umt5 import param_table, transformers_to_wan_key  # noqa: E402
from sparge_jax.models.umt5 import UMT5_CONFIGS, UMT5Config, UMT5Encoder  # noqa: E402

SMALL = UMT5Config(vocab_size=1000, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)


def random_encoder(config: UMT5Config, dtype, seed: int = 0) -> UMT5Encoder:
    """`UMT5Encoder` with random weights drawn on the default device (no float32 init pass)."""
    abstract = nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten_with_path(pure)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = []
    for (path, leaf), key in zip(leaves, keys):
        name = str(path[-1].key)
        if name == "scale":
            values.append(jnp.ones(leaf.shape, dtype))
        elif name == "embedding":
            values.append((0.5 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(dtype))
        else:
            values.append((jax.random.normal(key, leaf.shape, jnp.float32) / np.sqrt(leaf.shape[0])).astype(dtype))
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, values))
    return nnx.merge(graphdef, state)


def torch_encoder(model: UMT5Encoder, config: UMT5Config, device: str, dtype):
    """transformers' `UMT5EncoderModel` holding `model`'s weights (copied through DLPack)."""
    import torch
    from transformers import UMT5Config as HFConfig, UMT5EncoderModel

    hf_config = HFConfig(vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
                         num_layers=config.num_layers, num_heads=config.num_heads,
                         relative_attention_num_buckets=config.num_buckets,
                         relative_attention_max_distance=config.max_distance, layer_norm_epsilon=config.eps,
                         feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    with torch.device("meta"):
        hf = UMT5EncoderModel(hf_config)
    hf = hf.to_empty(device=device).to(dtype).eval()
    table = param_table(config)
    params = flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with torch.no_grad():
        for key, tensor in hf.state_dict().items():
            spec = table[transformers_to_wan_key(key)]
            source = torch.from_dlpack(params[spec.flax_path]).to(device=device, dtype=dtype)
            tensor.copy_(source.T if spec.kind == LINEAR else source)
    return hf


def torch_median(fn, reps: int, device: str) -> float:
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small float32 encoder on the CPU")
    parser.add_argument("--reps", type=int, default=10, help="calls per round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the encoders")
    parser.add_argument("--seq", type=int, default=512, help="prompt length in tokens")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="params and compute of the full-size encoders (--small: always float32)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the JAX encode's time goes (a profiler trace, step_profile.py)")
    parser.add_argument("--trace-out", help="with --profile: directory that keeps the trace and optimized HLO")
    args = parser.parse_args()
    if args.small:
        jax.config.update("jax_platforms", "cpu")
    config, dtype = (SMALL, jnp.float32) if args.small else (UMT5_CONFIGS["umt5-xxl"], jnp.dtype(args.dtype))
    if dtype == jnp.float32:
        jax.config.update("jax_default_matmul_precision", "highest")
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); {config.num_layers} layers, d_model {config.d_model}, "
          f"{jnp.dtype(dtype).name}, batch 1, {args.seq} tokens")

    model = random_encoder(config, dtype)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.seq), dtype=np.int32)
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()  # compiled once, for the timing and the --profile trace
    encode = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)).lower(state, ids, mask).compile()
    ours = np.asarray(jax.block_until_ready(encode(state, ids, mask)), np.float32)
    first = time.perf_counter() - t0
    timers = {"sparge_jax UMT5Encoder (jit)": (lambda: median_time(encode, state, ids, mask, reps=args.reps), first)}

    note = ""
    try:
        import torch
        import transformers
    except ImportError as missing:
        note = f"torch column skipped: {missing}"
    else:
        torch_device = "cuda" if device.platform == "gpu" and torch.cuda.is_available() else "cpu"
        torch_dtype = torch.float32 if dtype == jnp.float32 else torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = False
        hf = torch_encoder(model, config, torch_device, torch_dtype)
        ids_t = torch.from_numpy(ids).long().to(torch_device)
        mask_t = torch.from_numpy(mask).long().to(torch_device)

        def run():
            with torch.inference_mode():
                return hf(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

        t0 = time.perf_counter()
        theirs = run().float().cpu().numpy()
        torch_first = time.perf_counter() - t0
        timers[f"transformers {transformers.__version__} UMT5EncoderModel "
               f"(torch {torch.__version__}, {hf.config._attn_implementation})"] = (
            lambda: torch_median(run, args.reps, torch_device), torch_first)
        difference = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        note = f"relative difference of the outputs (JAX vs torch): {difference:.2e}"

    if note:
        print(note)
    # Rounds alternate the encoders, so a drift of the device's speed touches both alike.
    samples = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, (median, _) in timers.items():
            samples[name].append(median())
    if args.profile:
        print("\nms per encode by kind of op (JAX):\n" + breakdown_table(
            {"UMT5Encoder": op_breakdown(encode, (state, ids, mask), keep=args.trace_out)}))
    print(f"\n| encoder | ms per encode (median of {args.rounds} rounds) | range over rounds | first call s (compile) |"
          "\n|---|---|---|---|")
    for name, (_, first_call) in timers.items():
        ms = np.asarray(samples[name]) * 1e3
        print(f"| {name} | {np.median(ms):.2f} | {ms.min():.2f}-{ms.max():.2f} | {first_call:.1f} |")


if __name__ == "__main__":
    main()
