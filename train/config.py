"""Frozen training configuration: nested dataclasses, loaded from JSON plus `key=value` overrides."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import typing
from pathlib import Path
from typing import Any, Callable

from sparge_jax.config_builder import build_config, type_name, type_ok
from sparge_jax.dtypes import DTYPES
from train.procedural import SHAPES

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.json"
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.json"  # what `python -m train` runs


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which Wan model to distil.

    preset: a key of `sparge_jax.models.wan.WAN_CONFIGS` ("tiny", "t2v-1.3b", ...).
    overrides: `WanConfig` fields to change (e.g. {"num_layers": 2}), merged onto the preset by
      `sparge_jax.config_builder.build_config`; a "sparse" entry is a dict of `SparseConfig`
      fields ({"method": {"kind": "svg", ...}, "kernel": {"block_q": 64}}; the flat shorthand
      {"topk": 0.2, "block_q": 64} also works).
    weights: directory of an Orbax checkpoint of the model params (converted Wan2.1); None
      initialises randomly from `seed` (tests and the demo).
    compute_dtype: a name of `sparge_jax.dtypes.DTYPES` ("bfloat16", "float32"): the dtype the forward/backward runs in; master
      weights and optimizer state stay float32 (AdamW's first moment: `optim.mu_dtype`).
    remat: recompute each DiT block in the backward pass (activation memory per block only).
    remat_input_dtype: the dtype remat keeps each block's float32 input in for that recompute
      (with `overrides.scan_layers`): "float32" is exact; "bfloat16" halves those bytes (12.5 GiB
      for 14B at 480p, 28.8 at 720p) and computes the gradients at the rounded inputs
      (`sparge_jax.models.remat.checkpoint_block`; the forward and the loss are unchanged).
    residual_dtype: the dtype the DiT's residual stream is stored in (`WanModel`'s
      `residual_dtype`), student and teacher: "float32" as Wan2.1; "bfloat16" as diffusers' bf16
      pipeline (norms, modulation and adds still in float32, each sum rounded to bf16 once).
      With "bfloat16" the saved block inputs are bf16 already: remat_input_dtype has no effect.
    """

    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)
    weights: str | None = None
    compute_dtype: str = "bfloat16"
    remat: bool = True
    remat_input_dtype: str = "float32"
    residual_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """Loss = distill_weight * MSE(v_student, v_teacher) + flow_weight * MSE(v_student, eps - x0).

    distill_guidance: None distils the velocity under the batch's context (the paper's
      objective); a scale g >= 1 distils the classifier-free-guided velocity instead,
      `g v(c) - (g - 1) v(0)` of student and teacher (a second forward of each under an all-zero
      context: about twice the step's compute and activations). Guided sampling integrates that
      velocity, whose error conditional distillation leaves about as it was (docs/quality.md).
    shift: Wan's flow-matching shift s' = shift*s / (1 + (shift-1)*s).
    pure_noise_share: the share of the training draws at sigma = 1 (pure noise), the rest from the
      shifted schedule (0: none). The held-out losses stay on the shifted schedule.
    student_attention: the trained model's self-attention, "sparse" (distillation) or "dense"
      (with distill_weight 0 and flow_weight 1: training a dense model from scratch).
    """

    distill_weight: float = 1.0
    flow_weight: float = 0.0
    distill_guidance: float | None = None
    shift: float = 5.0
    pure_noise_share: float = 0.0
    student_attention: str = "sparse"


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warm-up then cosine decay to `lr * final_lr_ratio`, global-norm clipping.

    trainable: None trains every parameter; otherwise a regular expression on the
      "/"-joined parameter path (e.g. "self_attn" trains only the self-attention params).
    ema_decay: None (off) or d in (0, 1): keep a float32 exponential moving average of the
      trainable params, updated after each optimizer step with the decay min(d, (1 + t) / (10 + t))
      at update t (`train.optimizer.params_ema`); `TrainResult.ema_params` hands it out.
    mu_dtype: the dtype of AdamW's first moment (optax's `mu_dtype`): "float32", or "bfloat16"
      (2 bytes per trainable param less; the update rounds the moment to bf16 each step). The
      second moment stays float32: in bf16, b2 = 0.999's decay (nu * 0.999) would round back to
      nu, so it could not shrink.
    """

    lr: float = 1e-4
    warmup_steps: int = 10
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    trainable: str | None = None
    ema_decay: float | None = None
    mu_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class ProceduralSettings:
    """Procedural clips (`train.procedural`): size in pixels, space-to-depth factor (latent
    channels 3*s^2 must equal the model's in_dim), shape slots, the unconditional-context
    probability, and how many distinct clips the data set numbers. motion_scale: factor on every
    speed (1: the teacher's clips; else motion it never saw, a shifted data set). size_scale: factor
    on every shape's radius (1: 9-18 pixels before growing or shrinking). shape_kind: null (every kind)
    or one of `train.procedural.SHAPES`, the kind of every shape. render_on: where a batch is
    rendered, "host" (the CPU cores, overlapping the step) or "accelerator" (the default device:
    a few milliseconds on a GPU, queued behind the step; the latents stay there). start_region:
    captions also name where each shape starts (a 3 x 3 grid of the frame; `train.procedural`)."""

    examples: int = 100_000
    frames: int = 16
    height: int = 128
    width: int = 128
    space_to_depth: int = 4
    max_shapes: int = 3
    cfg_dropout: float = 0.1
    motion_scale: float = 1.0
    size_scale: float = 1.0
    shape_kind: str | None = None
    render_on: str = "host"
    start_region: bool = False


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """path: directory in the on-disk latent format (docs/training.md); None = generated data
    of kind `source`: "synthetic" (Gaussian latents) or "procedural" (`procedural` clips).

    batch_size: global batch per optimizer step (over all hosts, all micro-batches).
    grad_accum: micro-batches per step; batch_size must be divisible by it.
    synthetic_*: the synthetic data set used when path is None.
    validate: check every example read (finite values); a bad one stops the run with an
      error naming its shard and row. Off: such a step is skipped by the guard instead.
    prefetch: read the next step's batch on a background thread while the current step runs
      (`train.prefetch`); the same batches in the same order either way.
    """

    path: str | None = None
    batch_size: int = 2
    grad_accum: int = 1
    seed: int = 0
    synthetic_examples: int = 16
    synthetic_latent_shape: tuple[int, ...] = (3, 8, 8)
    synthetic_text_len: int = 8
    source: str = "synthetic"
    procedural: ProceduralSettings = ProceduralSettings()
    validate: bool = False
    prefetch: bool = True


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    """Non-finite guard: a step whose loss or gradients hold NaN/inf is skipped (no update;
    reported with the examples holding non-finite data, if any); `max_consecutive_skips`
    skipped steps in a row stop the run with an error."""

    max_consecutive_skips: int = 10


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Device mesh shape over (data, fsdp, context, tensor); -1 on one axis takes the remaining
    devices. context: context (sequence) parallelism, Ulysses style (`sparge_jax.context_parallel`):
    the tokens of each clip are split over it; num_heads and the token count must divide by it."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """dir: where Orbax checkpoints go (None: no checkpoints). every: save period in steps."""

    dir: str | None = None
    every: int = 100
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. `steps`: optimizer steps; `log_every`: metric period;
    `metrics_path`: JSONL file of metrics (None: `<checkpoint.dir>/metrics.jsonl` or none).
    `eval_every`: period in steps of the held-out evaluation (`train.heldout`; 0: none) on
    `eval_examples` held-out examples (procedural data only); `eval_guidance`: the
    classifier-free guidance scale of its `heldout_guided_gap` (Wan2.1 samples at 5).
    `eval_procedural`: the clips of that evaluation and of the report (None: `data.procedural`'s),
    e.g. the teacher's own distribution while fine-tuning on shifted clips; in a config file or
    an override (`eval_procedural.max_shapes=3`) the fields it leaves out are `data.procedural`'s.
    `tensorboard_dir`: also write the metrics as TensorBoard event files there (None: not). `report_path`: after training,
    the CLI prints `train.report.distillation_report` and writes its picture (PNG) there
    (needs eval_every > 0 and matplotlib, the `plots` extra; None: no report). `time_limit_s`:
    wall-clock seconds for one call of `train.loop.train` (start-up and compiles included; None:
    no limit): once they are spent the run ends after the current step as if it had been its
    last (held-out evaluation, metrics, checkpoint) with fewer than `steps` steps; the
    learning-rate schedule stays the one planned for `steps`. `compiler_options`: XLA options of
    the training step's compile (`jax.jit(..., compiler_options=...)`; names of XLA's
    DebugOptions, values bool / number / string), e.g. {"xla_gpu_enable_triton_gemm": false}:
    cuBLAS(Lt) instead of Triton GEMMs. An unknown name fails the compile; `xla_gpu_*` options
    are accepted and ignored by XLA's CPU backend."""

    model: ModelSettings = ModelSettings()
    objective: ObjectiveSettings = ObjectiveSettings()
    optim: OptimSettings = OptimSettings()
    data: DataSettings = DataSettings()
    mesh: MeshSettings = MeshSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    guard: GuardSettings = GuardSettings()
    steps: int = 20
    seed: int = 0
    log_every: int = 1
    metrics_path: str | None = None
    eval_every: int = 0
    eval_examples: int = 4
    eval_guidance: float = 5.0
    eval_procedural: ProceduralSettings | None = None
    tensorboard_dir: str | None = None
    report_path: str | None = None
    time_limit_s: float | None = None
    compiler_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_config(self)

    @property
    def heldout_procedural(self) -> ProceduralSettings:
        """The settings of the held-out evaluation's and the report's clips."""
        return self.data.procedural if self.eval_procedural is None else self.eval_procedural

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _valid_regex(value: str) -> bool:
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _known_preset(value: str) -> bool:
    from sparge_jax.models.wan import WAN_CONFIGS  # the model zoo, imported only when checking

    return value in WAN_CONFIGS


def _scans_layers(model: ModelSettings) -> bool:
    from sparge_jax.models.wan import WAN_CONFIGS

    return model.overrides.get("scan_layers", WAN_CONFIGS[model.preset].scan_layers) is True


_at_least = lambda low: (lambda v: v >= low, f">= {low}")
_positive = (lambda v: v > 0, "> 0")
_fraction = (lambda v: 0 <= v < 1, "in [0, 1)")
_dtype_name = (lambda v: v in DTYPES, " or ".join(map(repr, DTYPES)))
_PROCEDURAL_RANGES = {  # a ProceduralSettings section's, wherever it sits
    "examples": _at_least(1), "frames": _at_least(1), "height": _at_least(1), "width": _at_least(1),
    "space_to_depth": _at_least(1), "max_shapes": _at_least(1), "cfg_dropout": _fraction,
    "motion_scale": _positive, "size_scale": _positive,
    "shape_kind": (lambda v: v in SHAPES, " or ".join(map(repr, SHAPES)) + ", or null (every kind)"),
    "render_on": (lambda v: v in ("host", "accelerator"), "'host' or 'accelerator'"),
}
# Range rules per dotted key (types come from the dataclass annotations): (test, what is allowed).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": _at_least(1), "seed": _at_least(0), "log_every": _at_least(1),
    "model.preset": (_known_preset, "a key of sparge_jax.models.wan.WAN_CONFIGS"),
    "model.compute_dtype": _dtype_name, "model.remat_input_dtype": _dtype_name,
    "model.residual_dtype": _dtype_name, "optim.mu_dtype": _dtype_name,
    "objective.distill_weight": _at_least(0), "objective.flow_weight": _at_least(0),
    "objective.distill_guidance": (lambda v: v >= 1, ">= 1, or null (distil the conditional velocity)"), "objective.shift": _positive,
    "objective.pure_noise_share": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.lr": _positive, "optim.warmup_steps": _at_least(0), "optim.final_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.b1": _fraction, "optim.b2": _fraction, "optim.eps": _positive, "optim.weight_decay": _at_least(0),
    "optim.clip_norm": _positive, "optim.trainable": (_valid_regex, "a regular expression"),
    "optim.ema_decay": (lambda v: 0 < v < 1, "in (0, 1), or null (no EMA)"),
    "data.batch_size": _at_least(1), "data.grad_accum": _at_least(1), "data.seed": _at_least(0),
    "data.synthetic_examples": _at_least(1), "data.synthetic_text_len": _at_least(1),
    "data.synthetic_latent_shape": (lambda v: len(v) == 3 and min(v) >= 1, "3 positive ints (frames, height, width)"),
    "checkpoint.every": _at_least(1), "checkpoint.keep": _at_least(1),
    "guard.max_consecutive_skips": _at_least(1),
    "objective.student_attention": (lambda v: v in ("sparse", "dense"), "'sparse' or 'dense'"),
    "data.source": (lambda v: v in ("synthetic", "procedural"), "'synthetic' or 'procedural'"),
    **{f"{section}.{name}": rule for section in ("data.procedural", "eval_procedural")
       for name, rule in _PROCEDURAL_RANGES.items()},
    "eval_every": _at_least(0), "eval_examples": _at_least(1), "eval_guidance": _at_least(1), "time_limit_s": (lambda v: v > 0, "> 0, or null (no limit)"),
    "compiler_options": (lambda v: all(isinstance(x, (bool, int, float, str)) for x in v.values()),
                         "a dict of option name -> bool, number or string"),
}


def check_fields(settings, prefix: str = "") -> None:
    """Type- and range-check every field of a (nested) settings dataclass against its
    annotation and `RANGES`; ValueError naming the key, the value and what is allowed."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        key, value = prefix + field.name, getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
            continue
        if not type_ok(value, hints[field.name]):
            raise ValueError(f"config {key}={value!r}: expected {type_name(hints[field.name])}")
        test, allowed = RANGES.get(key, (None, ""))
        if value is not None and test is not None and not test(value):
            raise ValueError(f"config {key}={value!r}: must be {allowed}")


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError on a mistyped, out-of-range or inconsistent setting."""
    check_fields(cfg)
    d = cfg.data
    if d.batch_size % d.grad_accum:
        raise ValueError(f"data.batch_size ({d.batch_size}) must be a multiple of data.grad_accum ({d.grad_accum})")
    if cfg.model.remat_input_dtype != "float32" and not (cfg.model.remat and _scans_layers(cfg.model)):
        raise ValueError(f"model.remat_input_dtype={cfg.model.remat_input_dtype!r} needs model.remat=true and "
                         "model.overrides.scan_layers=true (unscanned blocks keep float32 inputs)")
    if not cfg.objective.distill_weight + cfg.objective.flow_weight > 0:
        raise ValueError("objective.distill_weight and objective.flow_weight must be >= 0 with a positive sum")
    if d.path is not None and d.source == "procedural":
        raise ValueError("data.path (on-disk latents) and data.source 'procedural' exclude each other")
    if cfg.report_path is not None and not cfg.eval_every:
        raise ValueError("report_path needs eval_every > 0 (the report compares held-out gaps before and after)")
    if cfg.report_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("report_path needs matplotlib to draw the samples, an optional extra: "
                         "pip install 'sparge-jax[plots]' (or report_path=null)")
    if cfg.eval_procedural is not None and not cfg.eval_every:
        raise ValueError("eval_procedural needs eval_every > 0 (it sets the held-out evaluation's clips)")
    if cfg.eval_every and (d.path is not None or d.source != "procedural"):
        raise ValueError("eval_every > 0 needs data.source 'procedural' (held-out clips) and no data.path")
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1; got {sizes}")


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false/null, lists, dicts), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `dotted` "a.b.c", creating dicts on the way."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ValueError(f"cannot set {dotted!r}: {key!r} is not a section")
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Config from a JSON file (default: the embedded tiny config) with `key.sub=value` overrides.

    A relative `model.weights` in the file is taken relative to the file's directory (so a
    config can name weights shipped beside it); one given as an override, relative to the
    working directory."""
    path = Path(path or DEFAULT_CONFIG)
    tree = json.loads(path.read_text())
    weights = tree.get("model", {}).get("weights")
    if isinstance(weights, str) and not Path(weights).is_absolute():
        tree["model"]["weights"] = str((path.parent / weights).resolve())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like key=value; got {item!r}")
        key, text = item.split("=", 1)
        apply_override(tree, key.strip(), parse_value(text))
    if isinstance(tree.get("eval_procedural"), dict):  # the fields it leaves out are data.procedural's
        tree["eval_procedural"] = {**tree.get("data", {}).get("procedural", {}), **tree["eval_procedural"]}
    return build_config(TrainConfig, tree)
