"""Names and layouts of Wan2.1 parameters in three formats, pure Python (no jax, no torch).

- original: Wan2.1's own checkpoints (`blocks.N.self_attn.q.weight`, `head.head.weight`, ...).
- diffusers: `WanTransformer3DModel` (`blocks.N.attn1.to_q.weight`, `proj_out.weight`, ...).
- flax: paths of `sparge_jax.models.wan.WanModel` params (`blocks.N.self_attn.q.kernel`, ...).

`param_table(config)` lists, for a model config, every original key with its torch shape, its
flax path and how the tensor is laid out (`LINEAR`: torch (out, in) vs flax (in, out); `CONV`:
torch (out, in, t, h, w) vs flax (t, h, w, in, out); `CONV2D`: torch (out, in, h, w) vs flax
(h, w, in, out); `VECTOR`: torch (n, 1, ...) vs flax (n,); `SAME`: identical). `config` is any object
with `WanConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
import math
import re

LINEAR, CONV, CONV2D, VECTOR, SAME = "linear", "conv", "conv2d", "vector", "same"

# Prefixes some exporters put before the model's own keys (ComfyUI-style files).
STRIPPED_PREFIXES = ("model.diffusion_model.",)

# Keys that some exported checkpoints carry but no Wan2.1 forward uses (diffusers skips them too).
IGNORED_KEY_PATTERN = re.compile(r"blocks\.\d+\.(attn2|cross_attn)\.norm_added_q\.(weight|bias)$")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: torch shape in the original format, flax path, layout kind."""

    shape: tuple[int, ...]
    flax_path: str
    kind: str


def _linear(table, original, flax, din, dout):
    table[f"{original}.weight"] = ParamSpec((dout, din), f"{flax}.kernel", LINEAR)
    table[f"{original}.bias"] = ParamSpec((dout,), f"{flax}.bias", SAME)


def _norm(table, original, flax, dim, bias):
    table[f"{original}.weight"] = ParamSpec((dim,), f"{flax}.scale", SAME)
    if bias:
        table[f"{original}.bias"] = ParamSpec((dim,), f"{flax}.bias", SAME)


def _attention(table, prefix, config, image_branch):
    d = config.dim
    for name in ("q", "k", "v", "o"):
        _linear(table, f"{prefix}.{name}", f"{prefix}.{name}", d, d)
    if config.qk_norm:
        _norm(table, f"{prefix}.norm_q", f"{prefix}.norm_q", d, bias=False)
        _norm(table, f"{prefix}.norm_k", f"{prefix}.norm_k", d, bias=False)
    if image_branch:
        _linear(table, f"{prefix}.k_img", f"{prefix}.k_img", d, d)
        _linear(table, f"{prefix}.v_img", f"{prefix}.v_img", d, d)
        if config.qk_norm:
            _norm(table, f"{prefix}.norm_k_img", f"{prefix}.norm_k_img", d, bias=False)


def param_table(config) -> dict[str, ParamSpec]:
    """Every parameter of a Wan2.1 model with this config, keyed by its original name."""
    d, i2v = config.dim, config.model_type == "i2v"
    table: dict[str, ParamSpec] = {}
    table["patch_embedding.weight"] = ParamSpec((d, config.in_dim, *config.patch_size), "patch_embedding.kernel", CONV)
    table["patch_embedding.bias"] = ParamSpec((d,), "patch_embedding.bias", SAME)
    _linear(table, "text_embedding.0", "text_embedding.linear_1", config.text_dim, d)
    _linear(table, "text_embedding.2", "text_embedding.linear_2", d, d)
    _linear(table, "time_embedding.0", "time_embedding.linear_1", config.freq_dim, d)
    _linear(table, "time_embedding.2", "time_embedding.linear_2", d, d)
    _linear(table, "time_projection.1", "time_projection", d, 6 * d)
    for n in range(config.num_layers):
        block = f"blocks.{n}"
        table[f"{block}.modulation"] = ParamSpec((1, 6, d), f"{block}.modulation", SAME)
        _attention(table, f"{block}.self_attn", config, image_branch=False)
        if config.cross_attn_norm:
            _norm(table, f"{block}.norm3", f"{block}.norm3", d, bias=True)
        _attention(table, f"{block}.cross_attn", config, image_branch=i2v)
        _linear(table, f"{block}.ffn.0", f"{block}.ffn.linear_1", d, config.ffn_dim)
        _linear(table, f"{block}.ffn.2", f"{block}.ffn.linear_2", config.ffn_dim, d)
    table["head.modulation"] = ParamSpec((1, 2, d), "head.modulation", SAME)
    _linear(table, "head.head", "head.head", d, config.out_dim * math.prod(config.patch_size))
    if i2v:
        _norm(table, "img_emb.proj.0", "img_emb.norm1", config.image_dim, bias=True)
        _linear(table, "img_emb.proj.1", "img_emb.mlp.linear_1", config.image_dim, config.image_dim)
        _linear(table, "img_emb.proj.3", "img_emb.mlp.linear_2", config.image_dim, d)
        _norm(table, "img_emb.proj.4", "img_emb.norm2", d, bias=True)
    return table


def flax_shape(spec: ParamSpec) -> tuple[int, ...]:
    """Shape of the parameter in the flax model."""
    if spec.kind == LINEAR:
        return spec.shape[::-1]
    if spec.kind in (CONV, CONV2D):
        out, inp, *kernel = spec.shape
        return (*kernel, inp, out)
    if spec.kind == VECTOR:
        return spec.shape[:1]
    return spec.shape


# diffusers name -> original name, matched on whole dotted segments (first match wins).
_DIFFUSERS_RULES = [
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"scale_shift_table$", "head.modulation"),
    (r"proj_out\.", "head.head."),
    (r"(blocks\.\d+\.)scale_shift_table$", r"\1modulation"),
    (r"(blocks\.\d+\.)attn1\.", r"\1self_attn."),
    (r"(blocks\.\d+\.)attn2\.", r"\1cross_attn."),
    (r"(blocks\.\d+\.)norm2\.", r"\1norm3."),  # diffusers' norm2 is the cross-attention norm
    (r"(blocks\.\d+\.)norm3\.", r"\1norm2."),  # and its norm3 the (parameter-free) FFN norm
    (r"(blocks\.\d+\.)ffn\.net\.0\.proj\.", r"\1ffn.0."),
    (r"(blocks\.\d+\.)ffn\.net\.2\.", r"\1ffn.2."),
]
_DIFFUSERS_ATTENTION_RULES = [
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."), (r"\.add_v_proj\.", ".v_img."), (r"\.norm_added_k\.", ".norm_k_img."),
]


def strip_prefix(key: str) -> str:
    for prefix in STRIPPED_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_diffusers_format(keys) -> bool:
    """True if the key set is in diffusers' naming (as opposed to Wan2.1's original)."""
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in map(strip_prefix, keys))


def rename_by_first_rule(key: str, rules) -> str:
    """`key` rewritten by the first `(pattern, replacement)` of `rules` whose pattern matches at
    its start; unchanged when none does."""
    for pattern, replacement in rules:
        new, count = re.subn("^" + pattern, replacement, key)
        if count:
            return new
    return key


def diffusers_to_original_key(key: str) -> str:
    """Original Wan2.1 name of a diffusers `WanTransformer3DModel` key; keys that match no rule
    come back unchanged (they then show up as unknown keys)."""
    key = rename_by_first_rule(strip_prefix(key), _DIFFUSERS_RULES)
    if ".self_attn." in key or ".cross_attn." in key:
        for pattern, replacement in _DIFFUSERS_ATTENTION_RULES:
            key = re.sub(pattern, replacement, key)
    return key


def to_original_key(key: str, diffusers: bool) -> str:
    """Original name of a key from a checkpoint in diffusers' (`diffusers=True`) or original format."""
    return diffusers_to_original_key(key) if diffusers else strip_prefix(key)
