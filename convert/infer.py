"""Infer a Wan2.1 architecture from parameter shapes (original key names); pure Python."""

from __future__ import annotations

import math
import re

# Wan2.1 models use 128-channel heads; head count is not visible in the tensor shapes.
DEFAULT_HEAD_DIM = 128

_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
             "blocks.0.ffn.0.weight", "head.head.weight")


def _num_heads(dim: int, sidecar: dict | None) -> int:
    for name in ("num_heads", "num_attention_heads"):
        if sidecar and isinstance(sidecar.get(name), int):
            return sidecar[name]
    if dim % DEFAULT_HEAD_DIM:
        raise ValueError(f"cannot infer num_heads for dim {dim} (not a multiple of {DEFAULT_HEAD_DIM}); "
                         "put a config.json with num_heads beside the checkpoint or pass --config")
    return dim // DEFAULT_HEAD_DIM


def infer_architecture(shapes: dict[str, tuple[int, ...]], sidecar: dict | None = None) -> dict:
    """`WanConfig` architecture fields from `{original key: torch shape}`.

    sidecar: the checkpoint's config.json (original or diffusers), used for the head count only.
    """
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the architecture: checkpoint lacks {missing}")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    fields = dict(
        model_type="i2v" if any(k.startswith("img_emb.") for k in shapes) else "t2v",
        patch_size=tuple(patch),
        in_dim=in_dim,
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        out_dim=shapes["head.head.weight"][0] // math.prod(patch),
        num_heads=_num_heads(dim, sidecar),
        num_layers=max(layers) + 1,
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )
    if fields["model_type"] == "i2v":
        if "img_emb.proj.1.weight" not in shapes:
            raise ValueError("cannot infer image_dim: checkpoint has img_emb.* but lacks img_emb.proj.1.weight")
        fields["image_dim"] = shapes["img_emb.proj.1.weight"][1]
    return fields
