"""Convert a umT5 text-encoder checkpoint (Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth`, or a
transformers `UMT5EncoderModel` folder) into a `sparge_jax` checkpoint: `params/` (Orbax),
`config.json` (`UMT5Config`) and `tokenizer/` (the tokenizer files, copied).

Names: Wan2.1's `T5Encoder` (wan/modules/t5.py) keys are the reference ("wan" names);
transformers' are renamed to them. The flax paths of `sparge_jax.models.umt5.UMT5Encoder`
follow the wan names (`blocks.N.attn.q.weight` -> `blocks.N.attn.q.kernel`).
"""

from __future__ import annotations

import os
import re
import shutil

from convert.keys import LINEAR, SAME, ParamSpec, rename_by_first_rule
from convert.pipeline import _listing, convert_streamed
from sparge_jax.dtypes import dtype_named

# Files of a umT5 tokenizer folder (google/umt5-xxl has all four); tokenizer.json is required.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")

# transformers name -> wan name (first match wins); `encoder.embed_tokens` is tied to `shared`.
_TRANSFORMERS_RULES = [
    (r"shared\.weight$", "token_embedding.weight"),
    (r"encoder\.embed_tokens\.weight$", "token_embedding.weight"),
    (r"encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
]


def is_umt5_keys(keys) -> bool:
    """True if the key set is a umT5 encoder's (wan or transformers names), not a Wan DiT's."""
    keys = set(keys)
    return "encoder.final_layer_norm.weight" in keys or {"token_embedding.weight", "norm.weight"} <= keys


def is_umt5_checkpoint(path: str) -> bool:
    """True if the checkpoint at `path` (file or folder) holds a umT5 encoder."""
    from convert.readers import open_checkpoint

    reader = open_checkpoint(path)
    try:
        return is_umt5_keys(reader.keys())
    finally:
        reader.close()


def is_transformers_format(keys) -> bool:
    return any(k.startswith("encoder.") or k == "shared.weight" for k in keys)


def transformers_to_wan_key(key: str) -> str:
    """Wan2.1 name of a transformers `UMT5EncoderModel` key; unmatched keys come back unchanged."""
    return rename_by_first_rule(key, _TRANSFORMERS_RULES)


def source_names(keys: list[str]) -> dict[str, str]:
    """{wan name: key in the file}. Of transformers' tied `shared.weight` and
    `encoder.embed_tokens.weight`, the first is read when both are there."""
    names: dict[str, str] = {}
    transformers = is_transformers_format(keys)
    for key in sorted(keys, key=lambda k: k != "shared.weight"):
        name = transformers_to_wan_key(key) if transformers else key
        if name in names:
            if name == "token_embedding.weight":
                continue
            raise ValueError(f"checkpoint keys {names[name]!r} and {key!r} both map to {name!r}")
        names[name] = key
    return names


def param_table(config) -> dict[str, ParamSpec]:
    """Every parameter of a `UMT5Encoder(config)`, keyed by its Wan2.1 name."""
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    table = {"token_embedding.weight": ParamSpec((config.vocab_size, d), "token_embedding.embedding", SAME),
             "norm.weight": ParamSpec((d,), "norm.scale", SAME)}
    for n in range(config.num_layers):
        b = f"blocks.{n}"
        table[f"{b}.norm1.weight"] = ParamSpec((d,), f"{b}.norm1.scale", SAME)
        table[f"{b}.norm2.weight"] = ParamSpec((d,), f"{b}.norm2.scale", SAME)
        for name in "qkv":
            table[f"{b}.attn.{name}.weight"] = ParamSpec((inner, d), f"{b}.attn.{name}.kernel", LINEAR)
        table[f"{b}.attn.o.weight"] = ParamSpec((d, inner), f"{b}.attn.o.kernel", LINEAR)
        table[f"{b}.pos_embedding.embedding.weight"] = ParamSpec(
            (config.num_buckets, config.num_heads), f"{b}.pos_embedding.embedding", SAME)
        table[f"{b}.ffn.gate.0.weight"] = ParamSpec((ff, d), f"{b}.ffn.gate.kernel", LINEAR)
        table[f"{b}.ffn.fc1.weight"] = ParamSpec((ff, d), f"{b}.ffn.fc1.kernel", LINEAR)
        table[f"{b}.ffn.fc2.weight"] = ParamSpec((d, ff), f"{b}.ffn.fc2.kernel", LINEAR)
    return table


def infer_config(shapes: dict[str, tuple[int, ...]], sidecar: dict | None):
    """`UMT5Config` from `{wan name: torch shape}`; max distance and eps from a transformers
    config.json beside the weights (`model_type` umt5), else umT5's 128 and 1e-6."""
    from sparge_jax.models.umt5 import UMT5Config

    required = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                "blocks.0.pos_embedding.embedding.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the umT5 architecture: checkpoint lacks {missing}")
    fields = {}
    if sidecar and sidecar.get("model_type") in ("umt5", "t5"):
        if sidecar.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError(f"only gated-GELU umT5 encoders are supported; config.json has feed_forward_proj "
                             f"{sidecar['feed_forward_proj']!r}")
        for ours, theirs in (("max_distance", "relative_attention_max_distance"), ("eps", "layer_norm_epsilon")):
            if theirs in sidecar:
                fields[ours] = sidecar[theirs]
    vocab, d_model = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    inner = shapes["blocks.0.attn.q.weight"][0]
    if inner % heads:
        raise ValueError(f"attention width {inner} (blocks.0.attn.q.weight) is not a multiple of the {heads} heads "
                         "of blocks.0.pos_embedding.embedding.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
                      d_ff=shapes["blocks.0.ffn.fc1.weight"][0], num_layers=max(layers) + 1, num_buckets=buckets,
                      **fields)


def resolve_config(shapes: dict, sidecar: dict | None, config=None):
    """`config` (a `UMT5_CONFIGS` name or a `UMT5Config`), or inferred from the shapes."""
    from sparge_jax.models.umt5 import UMT5_CONFIGS, UMT5Config

    if config is None:
        return infer_config(shapes, sidecar)
    if isinstance(config, UMT5Config):
        return config
    if config not in UMT5_CONFIGS:
        raise ValueError(f"config of a umT5 checkpoint must be one of {sorted(UMT5_CONFIGS)}; got {config!r}")
    return UMT5_CONFIGS[config]


def check_keys(shapes: dict[str, tuple[int, ...]], table: dict) -> None:
    """Raise ValueError listing unknown, missing and mis-shaped keys (wan names)."""
    unknown = sorted(set(shapes) - set(table))
    missing = sorted(set(table) - set(shapes))
    misshaped = sorted(f"{k} {tuple(shapes[k])} (expected {table[k].shape})"
                       for k in set(shapes) & set(table) if tuple(shapes[k]) != table[k].shape)
    if unknown or missing or misshaped:
        message = "checkpoint does not match the umT5 encoder"
        for title, items in (("unknown keys", unknown), ("missing keys", missing), ("mis-shaped keys", misshaped)):
            if items:
                message += _listing(title, items)
        raise ValueError(message)


def find_tokenizer(input_path: str) -> str | None:
    """The folder holding tokenizer.json for a checkpoint at `input_path`: its own folder, its
    `google/umt5-xxl` (Wan2.1's release layout) or a sibling `tokenizer` folder (diffusers'
    `text_encoder/` + `tokenizer/`); None if none has one."""
    folder = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    for candidate in (folder, os.path.join(folder, "google", "umt5-xxl"),
                      os.path.join(os.path.dirname(folder), "tokenizer")):
        if os.path.isfile(os.path.join(candidate, "tokenizer.json")):
            return candidate
    return None


def copy_tokenizer(source: str, destination: str) -> list[str]:
    """Copy the tokenizer files of `source` (tokenizer.json required) into `destination`."""
    if not os.path.isfile(os.path.join(source, "tokenizer.json")):
        raise ValueError(f"tokenizer folder {source} has no tokenizer.json (the umT5 tokenizer in the "
                         "`tokenizers` format, as google/umt5-xxl ships it)")
    os.makedirs(destination)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    for name in copied:
        shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    return copied


def convert_umt5(input_path: str, output_dir: str, *, config=None, dtype: str = "bf16", tokenizer=None,
                 progress: bool = True):
    """Convert the umT5 encoder checkpoint at `input_path` (a `.pth`/`.safetensors` file or a
    folder; Wan2.1 or transformers names) into `output_dir`: `params/`, `config.json` and
    `tokenizer/`. Returns `(UMT5Config, tokenizer folder read or None)`.

    Streamed like the DiT (`convert.pipeline`): one tensor at a time into a staging file that
    Orbax writes from; everything goes to a hidden staging folder renamed at the end, removed on
    any error or signal. tokenizer: folder with tokenizer.json (None: `find_tokenizer`; when it
    finds none, no `tokenizer/` is written and the output encodes token ids only).
    """
    from convert.readers import sidecar_config
    from sparge_jax.models.text_encoder import TOKENIZER_DIR

    dtype_named(dtype)  # a ValueError naming the allowed names before anything is written
    if tokenizer is not None and not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        raise ValueError(f"tokenizer folder {tokenizer} has no tokenizer.json")
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(os.fspath(input_path))

    def plan(reader):
        names = source_names(reader.keys())
        shapes = {name: tuple(reader.shape(key)) for name, key in names.items()}
        umt5_config = resolve_config(shapes, sidecar_config(os.fspath(input_path)), config)
        table = param_table(umt5_config)
        check_keys(shapes, table)
        return names, table, umt5_config

    def add_tokenizer(staging):
        if tokenizer is not None:
            copy_tokenizer(tokenizer, os.path.join(staging, TOKENIZER_DIR))

    umt5_config = convert_streamed(input_path, output_dir, plan, dtype=dtype, progress=progress,
                                   add_files=add_tokenizer)
    return umt5_config, tokenizer
