"""Frozen training configuration: nested dataclasses, loaded from JSON plus `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.json"
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.json"  # what `python -m train` runs


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which Wan model to distil.

    preset: a key of `sparge_jax.models.wan.WAN_CONFIGS` ("tiny", "t2v-1.3b", ...).
    overrides: `WanConfig` fields to change (e.g. {"num_layers": 2}); a "sparse" entry is a
      dict of `SparseConfig` fields.
    weights: directory of an Orbax checkpoint of the model params (converted Wan2.1); None
      initialises randomly from `seed` (tests and the demo).
    compute_dtype: "bfloat16" or "float32": the dtype the forward/backward runs in; master
      weights and optimizer state stay float32.
    remat: recompute each DiT block in the backward pass (activation memory per block only).
    """

    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)
    weights: str | None = None
    compute_dtype: str = "bfloat16"
    remat: bool = True


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """Loss = distill_weight * MSE(v_student, v_teacher) + flow_weight * MSE(v_student, eps - x0).

    shift: Wan's flow-matching shift s' = shift*s / (1 + (shift-1)*s).
    student_attention: the trained model's self-attention, "sparse" (distillation) or "dense"
      (with distill_weight 0 and flow_weight 1: training a dense model from scratch).
    """

    distill_weight: float = 1.0
    flow_weight: float = 0.0
    shift: float = 5.0
    student_attention: str = "sparse"


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warm-up then cosine decay to `lr * final_lr_ratio`, global-norm clipping.

    trainable: None trains every parameter; otherwise a regular expression on the
      "/"-joined parameter path (e.g. "self_attn" trains only the self-attention params).
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


@dataclasses.dataclass(frozen=True)
class ProceduralSettings:
    """Procedural clips (`train.procedural`): size in pixels, space-to-depth factor (latent
    channels 3*s^2 must equal the model's in_dim), shape slots, the unconditional-context
    probability, and how many distinct clips the data set numbers."""

    examples: int = 100_000
    frames: int = 16
    height: int = 128
    width: int = 128
    space_to_depth: int = 4
    max_shapes: int = 3
    cfg_dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """path: directory in the on-disk latent format (docs/training.md); None = generated data
    of kind `source`: "synthetic" (Gaussian latents) or "procedural" (`procedural` clips).

    batch_size: global batch per optimizer step (over all hosts, all micro-batches).
    grad_accum: micro-batches per step; batch_size must be divisible by it.
    synthetic_*: the synthetic data set used when path is None.
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


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Device mesh shape over (data, fsdp, tensor); -1 on one axis takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


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
    `eval_examples` held-out examples (procedural data only). `tensorboard_dir`: also write
    the metrics as TensorBoard event files there (None: not). `report_path`: after training,
    the CLI prints `train.report.distillation_report` and writes its picture (PNG) there
    (needs eval_every > 0; None: no report)."""

    model: ModelSettings = ModelSettings()
    objective: ObjectiveSettings = ObjectiveSettings()
    optim: OptimSettings = OptimSettings()
    data: DataSettings = DataSettings()
    mesh: MeshSettings = MeshSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    steps: int = 20
    seed: int = 0
    log_every: int = 1
    metrics_path: str | None = None
    eval_every: int = 0
    eval_examples: int = 4
    tensorboard_dir: str | None = None
    report_path: str | None = None

    def __post_init__(self):
        check_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError on inconsistent settings."""
    if cfg.steps <= 0:
        raise ValueError(f"steps must be positive; got {cfg.steps}")
    if cfg.model.compute_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"model.compute_dtype must be 'bfloat16' or 'float32'; got {cfg.model.compute_dtype!r}")
    d = cfg.data
    if d.grad_accum <= 0 or d.batch_size <= 0 or d.batch_size % d.grad_accum:
        raise ValueError(
            f"data.batch_size ({d.batch_size}) must be a positive multiple of data.grad_accum ({d.grad_accum})"
        )
    if cfg.objective.distill_weight < 0 or cfg.objective.flow_weight < 0 or not (
        cfg.objective.distill_weight + cfg.objective.flow_weight > 0
    ):
        raise ValueError("objective.distill_weight and objective.flow_weight must be >= 0 with a positive sum")
    if cfg.objective.student_attention not in ("sparse", "dense"):
        raise ValueError(f"objective.student_attention must be 'sparse' or 'dense'; got {cfg.objective.student_attention!r}")
    if d.source not in ("synthetic", "procedural"):
        raise ValueError(f"data.source must be 'synthetic' or 'procedural'; got {d.source!r}")
    if d.path is not None and d.source == "procedural":
        raise ValueError("data.path (on-disk latents) and data.source 'procedural' exclude each other")
    if cfg.eval_every < 0 or cfg.eval_examples <= 0:
        raise ValueError(f"eval_every must be >= 0 and eval_examples positive; got {cfg.eval_every}, {cfg.eval_examples}")
    if cfg.report_path is not None and not cfg.eval_every:
        raise ValueError("report_path needs eval_every > 0 (the report compares held-out gaps before and after)")
    if cfg.eval_every and (d.path is not None or d.source != "procedural"):
        raise ValueError("eval_every > 0 needs data.source 'procedural' (held-out clips) and no data.path")
    if cfg.objective.shift <= 0:
        raise ValueError(f"objective.shift must be positive; got {cfg.objective.shift}")
    if cfg.checkpoint.every <= 0:
        raise ValueError(f"checkpoint.every must be positive; got {cfg.checkpoint.every}")
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1; got {sizes}")


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'the top level'}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


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
    return _build(TrainConfig, tree, "")
