"""Memory per device and communication per step of Wan distillation on a (data, fsdp, context, tensor) mesh.

    python benchmarks/memory_model.py              # the tables of docs/training.md (no GPU needed)
    python benchmarks/memory_model.py --measure    # also a 1.3B distillation step on this (one-GPU)
                                                   # machine: measured peak memory next to the model's
    python benchmarks/memory_model.py --measure --preset t2v-14b --latent-shape 21 60 104 --trainable self_attn
                                                   # the 14B one-GPU case at 480p (needs an H200 and
                                                   # XLA_PYTHON_CLIENT_MEM_FRACTION=0.97: XLA takes 75 % by default)
    python benchmarks/memory_model.py --measure --ema-decay 0.999   # the measured step keeps an EMA too
    python benchmarks/memory_model.py --measure --preset t2v-14b --latent-shape 21 60 104 --trainable self_attn \
        --mu-dtype bfloat16 --remat-input-dtype bfloat16   # with the memory options (`optim.mu_dtype`, ...)
        [--residual-dtype bfloat16]                        # and a bf16 residual stream (`model.residual_dtype`)

The model (docs/training.md, "Memory model") counts, per device, for a step with remat and
scanned blocks (`scan_layers`, what `--measure` runs):
  params     float32 master weights of the trainable params, the frozen ones (`optim.trainable`)
             in the compute dtype, sharded over fsdp * context (and tensor for attention/FFN)
  teacher    the frozen teacher's own copy of the trainable params in the compute dtype (it
             reads the frozen ones from the student), sharded the same way
  optimizer  AdamW's moments of the trainable params: mu in `optim.mu_dtype`, nu float32
  ema        with `optim.ema_decay`: the float32 EMA of the trainable params (0 without)
 during the forward and backward:
  stacked    the student's compute-dtype stack of the trainable block params (what the scan
             differentiates) and the stack of their gradient
  gathered   one block's weights gathered in the compute dtype, student and teacher (FSDP; a
             scanned step reads each layer's frozen ones this way too)
  saved      with remat: each block's input in `model.remat_input_dtype` (micro, tokens / context, dim)
  block      the working set of one block's backward: `activation_bytes_per_token` per token
 after the backward (the saved inputs are gone):
  grads      float32 gradients of the trainable params, beside their compute-dtype stack
The peak is params + teacher + optimizer + ema + the larger of the two phases (`peak`); XLA's
plan of the 14B step on the CPU (`benchmarks/step_memory.py`) peaks in the backward, with no
float32 gradient alive yet. Parameter counts come from the model itself (`jax.eval_shape`,
nothing allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import tempfile
from pathlib import Path

import jax

from sparge_jax.dtypes import DTYPES

GIB = 2**30
# Video sizes (81 frames): latents (21, h/8, w/8) patched by (1, 2, 2).
TOKENS = {"480p": 21 * 30 * 52, "720p": 21 * 45 * 80}
TEXT_TOKENS = 512


def activation_bytes_per_token(dim: int, ffn_dim: int, tensor: int, compute_bytes: int,
                               residual_bytes: int = 4) -> float:
    """Bytes per token held while one block runs its backward (remat recomputes it first):
    residual stream copies (x, two modulated norms, cross-attention norm, gates: ~8 x dim x
    `residual_bytes`, float32 unless `model.residual_dtype`), the compute-dtype q, k, v,
    attention output and their Ulysses all-to-all copies, cross-attention q and output
    (~10 x dim x c), the FFN hidden before and after
    GELU (2 x ffn_dim x c) and the matching gradients (x 2). Head and FFN terms split over
    `tensor`. An estimate: checked against the measured peak with `--measure`."""
    return 2 * (8 * dim * residual_bytes + (10 * dim + 2 * ffn_dim) * compute_bytes / tensor)


@dataclasses.dataclass(frozen=True)
class Mesh:
    data: int = 1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.context * self.tensor


@functools.cache
def abstract_params(preset: str):
    """(model parts, abstract param tree) of a `WAN_CONFIGS` preset (shapes only, nothing allocated)."""
    from train.config import ModelSettings
    from train.model import abstract_model

    return abstract_model(ModelSettings(preset=preset))


@functools.cache
def param_counts(preset: str) -> tuple[int, int, int, int]:
    """(all params, params of one block, model dim, ffn dim) of a `WAN_CONFIGS` preset."""
    parts, params = abstract_params(preset)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    block = sum(math.prod(x.shape) for x in jax.tree.leaves(params["blocks"][0]))
    return total, block, parts.config.dim, parts.config.ffn_dim


@functools.cache
def trainable_count(preset: str, trainable: str | None, blocks_only: bool = False) -> int:
    """Params of a `WAN_CONFIGS` preset that `optim.trainable=trainable` trains (all for None);
    `blocks_only`: of those, the ones inside the DiT blocks."""
    from train.optimizer import trainable_labels

    _, params = abstract_params(preset)
    tree = params["blocks"] if blocks_only else params
    labels = trainable_labels(params, trainable)
    labels = labels["blocks"] if blocks_only else labels
    return sum(math.prod(x.shape) for x, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels))
               if label == "train")


STATE_TERMS = ("params", "teacher", "optimizer", "ema")
BACKWARD_TERMS = ("stacked", "gathered", "saved", "block")
UPDATE_TERMS = ("grads",)


def memory(preset: str, tokens: int, mesh: Mesh, micro_per_device: int = 1, compute_bytes: int = 2,
           remat: bool = True, trainable: str | None = None, ema: bool = False, mu_dtype: str = "float32",
           remat_input_dtype: str = "float32", residual_dtype: str = "float32") -> dict[str, float]:
    """Bytes per device of each term (see the module docstring), for `micro_per_device`
    clips per (data * fsdp) shard in one micro-batch; `trainable` is `optim.trainable`, `ema`
    whether `optim.ema_decay` is set, `mu_dtype` `optim.mu_dtype`, `remat_input_dtype`
    `model.remat_input_dtype`, `residual_dtype` `model.residual_dtype` (the block inputs are
    residual-stream values: saved in the narrower of it and `remat_input_dtype`). "grads"
    includes the gradient's compute-dtype stack."""
    from sparge_jax.models.wan import WAN_CONFIGS

    total, block, dim, ffn_dim = param_counts(preset)
    trained = trainable_count(preset, trainable)
    stacked = compute_bytes * trainable_count(preset, trainable, blocks_only=True)
    layers = WAN_CONFIGS[preset].num_layers
    shard = mesh.fsdp * mesh.context * mesh.tensor  # every big kernel is split over all three
    local_tokens = micro_per_device * tokens / mesh.context
    residual_bytes = DTYPES[residual_dtype].itemsize
    per_token = activation_bytes_per_token(dim, ffn_dim, mesh.tensor, compute_bytes, residual_bytes)
    input_bytes = min(DTYPES[remat_input_dtype].itemsize, residual_bytes)
    saved = layers * local_tokens * dim * input_bytes if remat else layers * local_tokens * per_token
    return {
        "params": (4 * trained + compute_bytes * (total - trained)) / shard,
        "teacher": compute_bytes * trained / shard,
        "optimizer": (DTYPES[mu_dtype].itemsize + 4) * trained / shard,
        "ema": 4 * trained / shard if ema else 0.0,
        "stacked": 2 * stacked / shard,
        "gathered": 2 * compute_bytes * block / mesh.tensor,
        "saved": saved,
        "block": local_tokens * per_token + micro_per_device * TEXT_TOKENS * dim * 4,
        "grads": (4 * trained + stacked) / shard,
    }


def peak(terms: dict[str, float]) -> float:
    """The step's peak of `memory`'s terms: the state, the teacher and the larger of the
    backward's and the update's buffers."""
    return (sum(terms[k] for k in STATE_TERMS)
            + max(sum(terms[k] for k in BACKWARD_TERMS), sum(terms[k] for k in UPDATE_TERMS)))


def step_flops(preset: str, tokens: int, density: float) -> float:
    """FLOPs of one clip's distillation step: student forward + remat recompute + backward (4
    forwards) with block-sparse attention at `density`, plus the dense teacher's forward."""
    from sparge_jax.models.wan import WAN_CONFIGS

    total, block, dim, _ = param_counts(preset)
    layers = WAN_CONFIGS[preset].num_layers
    linear = 2 * total * tokens  # every weight is used once per token (text/time terms are small)
    attention = layers * 4 * tokens * tokens * dim  # q k^T and p v, 2 flops per multiply-add
    return 4 * (linear + density * attention) + (linear + attention)


def communication(preset: str, tokens: int, mesh: Mesh, micro_per_device: int = 1,
                  compute_bytes: int = 2) -> dict[str, float]:
    """Bytes each device sends per micro-batch: the Ulysses all-to-alls (q, k, v in, output back:
    4 per self-attention, run in the student's forward, its recompute and backward, and the
    teacher's forward: 16 per layer) and the FSDP traffic (compute-dtype weights gathered for
    the student's forward, again for its backward, and for the teacher; float32 gradients
    reduce-scattered)."""
    from sparge_jax.models.wan import WAN_CONFIGS

    total, _, dim, _ = param_counts(preset)
    layers = WAN_CONFIGS[preset].num_layers
    c, f = mesh.context, mesh.fsdp * mesh.context
    shard_bytes = micro_per_device * tokens / c * dim * compute_bytes / mesh.tensor
    all_to_all = 16 * layers * shard_bytes * (c - 1) / c
    fsdp = (3 * compute_bytes + 4) * total / mesh.tensor * (f - 1) / f
    return {"all_to_all": all_to_all, "fsdp": fsdp}


# (name, mesh) of the throughput estimate; one clip per (data * fsdp) shard per micro-batch
PLANS = (
    ("8 GPUs: context 8", Mesh(context=8)),
    ("8 GPUs: fsdp 8", Mesh(fsdp=8)),
    ("64 GPUs: fsdp 8 x context 8", Mesh(fsdp=8, context=8)),
    ("64 GPUs: fsdp 64", Mesh(fsdp=64)),
)
NVLINK = 450e9  # bytes/s per direction per GPU (H100 / H200 NVLink 4: 900 GB/s both ways)
NETWORK = 50e9  # bytes/s per GPU between nodes (one 400 Gb/s NIC per GPU)
PEAK_FLOPS = 989e12  # bf16 dense, H100 / H200 SXM
MFU = 0.4  # assumed fraction of peak the step reaches


# (preset, mesh, optim.trainable, options of `memory`) of the extra rows: 14B distillation of
# the self-attention only on one GPU, and on two with context parallelism; with an EMA
# (`optim.ema_decay`), those and 1.3B fine-tuned whole on one GPU; the one-GPU 14B case with the
# memory options, bf16 AdamW first moment (`optim.mu_dtype`), then bf16 saved block inputs too
# (`model.remat_input_dtype`), then a bf16 residual stream too (`model.residual_dtype`).
BF16_MU = {"mu_dtype": "bfloat16"}
BF16_MU_AND_INPUTS = {**BF16_MU, "remat_input_dtype": "bfloat16"}
BF16_RESIDUAL = {**BF16_MU_AND_INPUTS, "residual_dtype": "bfloat16"}
TRAINABLE_ROWS = (("t2v-14b", Mesh(), "self_attn", {}), ("t2v-14b", Mesh(context=2), "self_attn", {}),
                  ("t2v-1.3b", Mesh(), None, {"ema": True}), ("t2v-14b", Mesh(), "self_attn", {"ema": True}),
                  ("t2v-14b", Mesh(context=2), "self_attn", {"ema": True}),
                  ("t2v-14b", Mesh(), "self_attn", BF16_MU), ("t2v-14b", Mesh(), "self_attn", BF16_MU_AND_INPUTS),
                  ("t2v-14b", Mesh(context=2), "self_attn", BF16_MU_AND_INPUTS),
                  ("t2v-14b", Mesh(), "self_attn", BF16_RESIDUAL))
COLUMNS = (*STATE_TERMS, *BACKWARD_TERMS, *UPDATE_TERMS)


def options_name(trainable: str | None, options: dict) -> str:
    """Short row label: optim.trainable and the non-default options of `memory`."""
    names = {"ema": "ema", "mu_dtype": "mu", "remat_input_dtype": "in", "residual_dtype": "res"}
    short = [names[k] if v is True else f"{names[k]} {'bf16' if v == 'bfloat16' else v}" for k, v in options.items()]
    return " ".join([trainable or "all", *short])


def print_tables() -> None:
    print("Memory per device (GiB), bf16 compute, remat on, scanned blocks, 1 clip per data*fsdp shard per "
          "micro-batch; total = params + teacher + optimizer + ema + max(backward: stacked + gathered + saved + "
          "block, update: grads)")
    print(f"{'model':10} {'video':5} {'tokens':>6} {'mesh (d,f,c,t)':>15} {'trainable, options':>34} "
          + " ".join(f"{k:>9}" for k in (*COLUMNS, "total")))
    meshes = (Mesh(), Mesh(fsdp=8), Mesh(context=8), Mesh(fsdp=8, context=8), Mesh(context=4, tensor=2))
    rows = [(preset, video, mesh, None, {}) for preset in ("t2v-1.3b", "t2v-14b") for video in TOKENS
            for mesh in meshes]
    rows += [(preset, video, mesh, trainable, options) for preset, mesh, trainable, options in TRAINABLE_ROWS
             for video in TOKENS]
    for preset, video, mesh, trainable, options in rows:
        terms = memory(preset, TOKENS[video], mesh, trainable=trainable, **options)
        shape = f"{mesh.data},{mesh.fsdp},{mesh.context},{mesh.tensor}"
        print(f"{preset:10} {video:5} {TOKENS[video]:>6} {shape:>15} {options_name(trainable, options):>34} "
              + " ".join(f"{v / GIB:>9.2f}" for v in (*(terms[k] for k in COLUMNS), peak(terms))))
    print()
    print(f"14B 720p distillation, one step of one clip per context group (tokens {TOKENS['720p']}); "
          f"compute at {MFU:.0%} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s; NVLink {NVLINK / 1e9:.0f} GB/s, "
          f"network {NETWORK / 1e9:.0f} GB/s per GPU")
    for density in (1.0, 0.1):
        flops = step_flops("t2v-14b", TOKENS["720p"], density)
        print(f"attention density {density}: {flops:.3g} FLOPs per clip")
        for name, mesh in PLANS:
            comm = communication("t2v-14b", TOKENS["720p"], mesh)
            per_device_s = flops / mesh.context / (PEAK_FLOPS * MFU)  # one clip per (data * fsdp) shard
            a2a_s = comm["all_to_all"] / NVLINK  # context stays inside a node
            link = NVLINK if mesh.devices <= 8 else NETWORK
            fsdp_s = comm["fsdp"] / link
            clips = mesh.data * mesh.fsdp
            step_s = max(per_device_s, a2a_s + fsdp_s)
            print(f"  {name:30} compute {per_device_s:6.1f} s  all-to-all {comm['all_to_all'] / 1e9:6.1f} GB "
                  f"({a2a_s:5.2f} s)  fsdp {comm['fsdp'] / 1e9:6.1f} GB ({fsdp_s:5.2f} s)  "
                  f"-> {clips} clips per {step_s:5.1f} s = {clips / step_s:5.2f} clips/s")


def measure(preset: str, latent_shape: list[int], steps: int, trainable: str | None = None,
            ema_decay: float | None = None, mu_dtype: str = "float32", remat_input_dtype: str = "float32",
            residual_dtype: str = "float32") -> None:
    """Distillation steps of `preset` (`optim.trainable=trainable`, `optim.ema_decay=ema_decay`,
    `optim.mu_dtype`, `model.remat_input_dtype`, `model.residual_dtype`) on this (one-device)
    machine; the time of each step and the peak memory next to the model's.

    The block stack is scanned (`scan_layers`: one compiled block instead of one per layer, a
    fraction of the compile time); with remat it saves each block's input as the model counts.
    The first step's time includes the compile."""
    from train.config import load_config
    from train.loop import train

    device = jax.devices()[0]
    metrics = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    cfg = load_config(None, [
        f"model.preset={preset}", "model.overrides={}", "model.overrides.scan_layers=true",
        "model.compute_dtype=bfloat16", "model.remat=true", f"model.remat_input_dtype={remat_input_dtype}",
        f"model.residual_dtype={residual_dtype}",
        f"data.synthetic_latent_shape={json.dumps(latent_shape)}", f"data.synthetic_text_len={TEXT_TOKENS}",
        "data.batch_size=1", "data.synthetic_examples=4", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
        f"steps={steps}", "optim.warmup_steps=1", f"metrics_path={metrics}", f"optim.mu_dtype={mu_dtype}",
        *([f"optim.trainable={trainable}"] if trainable else []), f"optim.ema_decay={json.dumps(ema_decay)}",
    ])
    with jax.default_device(device):
        train(cfg, progress=False)
    stats = device.memory_stats() or {}
    tokens = latent_shape[0] * (latent_shape[1] // 2) * (latent_shape[2] // 2)
    terms = memory(preset, tokens, Mesh(), trainable=trainable, ema=ema_decay is not None, mu_dtype=mu_dtype,
                   remat_input_dtype=remat_input_dtype, residual_dtype=residual_dtype)
    predicted = peak(terms)
    print(f"measured on {device.device_kind}: {preset} distillation step, latents {latent_shape} ({tokens} tokens), "
          f"trainable {trainable or 'all'}, EMA {'off' if ema_decay is None else ema_decay}, mu {mu_dtype}, "
          f"saved block inputs {remat_input_dtype}, residual stream {residual_dtype}")
    times = [json.loads(line)["step_time"] for line in metrics.read_text().splitlines()]
    print("step times (s; the first compiles): " + ", ".join(f"{t:.2f}" for t in times))
    print("model terms (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in terms.items()))
    measured = stats.get("peak_bytes_in_use")
    if measured is None:
        print("this device reports no peak memory (a CPU): nothing to compare")
    else:
        print(f"predicted {predicted / GIB:.2f} GiB, measured peak {measured / GIB:.2f} GiB "
              f"(ratio {measured / predicted:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true",
                        help="also measure a distillation step's peak memory here (one visible device)")
    parser.add_argument("--preset", default="t2v-1.3b", help="model of the measured step")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=[21, 16, 16], metavar=("F", "H", "W"),
                        help="latents of the measured step (default 21 16 16: 1344 tokens)")
    parser.add_argument("--steps", type=int, default=1, help="distillation steps (the first one reaches the peak)")
    parser.add_argument("--trainable", default=None,
                        help="optim.trainable of the measured step (e.g. self_attn; default: every param)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="optim.ema_decay of the measured step (default: no EMA)")
    parser.add_argument("--mu-dtype", choices=tuple(DTYPES), default="float32",
                        help="optim.mu_dtype of the measured step (AdamW's first moment)")
    parser.add_argument("--remat-input-dtype", choices=tuple(DTYPES), default="float32",
                        help="model.remat_input_dtype of the measured step (saved block inputs)")
    parser.add_argument("--residual-dtype", choices=tuple(DTYPES), default="float32",
                        help="model.residual_dtype of the measured step (the DiT's residual stream)")
    args = parser.parse_args()
    print_tables()
    if args.measure:
        print()
        measure(args.preset, args.latent_shape, args.steps, args.trainable, args.ema_decay, args.mu_dtype,
                args.remat_input_dtype, args.residual_dtype)


if __name__ == "__main__":
    main()
