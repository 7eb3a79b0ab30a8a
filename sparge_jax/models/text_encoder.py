"""Prompts -> the `context` a Wan2.1 DiT cross-attends to: the umT5 tokenizer (`tokenizers`,
reading the checkpoint's tokenizer.json) joined with `UMT5Encoder`, as Wan2.1's pipeline and
diffusers' `WanPipeline._get_t5_prompt_embeds` do it: clean each prompt (ftfy, HTML entities,
runs of whitespace), tokenize with the end-of-sequence token, pad / truncate to `text_len` (512),
encode with the padding mask, zero the padded positions.

A converted text encoder (`sparge-convert models_t5_umt5-xxl-enc-bf16.pth OUT`) is a folder with
`params/` (Orbax), `config.json` (`UMT5Config`) and `tokenizer/` (tokenizer.json, ...).
"""

from __future__ import annotations

import html
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.models.checkpoint import PARAMS_DIR, restore_model, stored_fields
from sparge_jax.models.umt5 import UMT5Config, UMT5Encoder

TOKENIZER_DIR = "tokenizer"
# Wan2.1's text length: every prompt is padded (or truncated) to 512 tokens.
TEXT_LEN = 512


def clean_prompt(text: str) -> str:
    """Wan2.1's prompt cleaning: ftfy's mojibake fixes, HTML entities decoded (twice), every run
    of whitespace made one space, ends stripped."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """A umT5 tokenizer.json (read by the `tokenizers` package): `prompts -> (ids, mask)`, int32
    `(len(prompts), text_len)` each, with the end-of-sequence token appended, truncated to
    `text_len` tokens (the end token kept) and padded with the pad token (mask 0 there)."""

    def __init__(self, folder: str, text_len: int = TEXT_LEN):
        from tokenizers import Tokenizer

        if not isinstance(text_len, int) or text_len < 2:
            raise ValueError(f"text_len must be an int >= 2; got {text_len!r}")
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer folder must hold tokenizer.json; {path} not found")
        tokenizer = Tokenizer.from_file(path)
        pad_id = tokenizer.token_to_id("<pad>")
        if pad_id is None:
            raise ValueError(f"{path} has no <pad> token; not a umT5 tokenizer")
        tokenizer.enable_truncation(max_length=text_len)
        tokenizer.enable_padding(length=text_len, pad_id=pad_id, pad_token="<pad>")
        self.tokenizer, self.text_len, self.pad_id = tokenizer, text_len, pad_id

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of strings; got {type(prompts).__name__}")
        encodings = self.tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(encodings), self.text_len)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
        return ids, mask


def read_umt5_config(directory: str) -> UMT5Config:
    """The `UMT5Config` stored in a converted text-encoder folder."""
    return UMT5Config.from_dict(stored_fields(directory, "a umT5 checkpoint", name="text encoder folder"))


def load_umt5(directory: str, *, dtype=None, param_dtype=None) -> UMT5Encoder:
    """`UMT5Encoder` from a converted folder. dtype: compute dtype of the projections (None: the
    params'); param_dtype: dtype to hold the params in (None: as stored)."""
    directory = os.path.abspath(directory)
    config = read_umt5_config(directory)
    return restore_model(os.path.join(directory, PARAMS_DIR),
                         lambda param_dtype: UMT5Encoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                         param_dtype=param_dtype),
                         param_dtype)


@jax.jit
def _encode(graphdef, state, ids, mask):
    hidden = nnx.merge(graphdef, state)(ids, mask)
    return jnp.where(mask[..., None] > 0, hidden, 0.0)


class TextEncoder:
    """Prompts -> float32 `(len(prompts), text_len, d_model)` context, padded positions zero.

    `encode_ids(ids, mask)` runs the same on token ids (no tokenizer needed)."""

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer | None = None, *, clean: bool = True):
        self.model, self.tokenizer, self.clean = model, tokenizer, clean
        self._graphdef, self._state = nnx.split(model)

    def encode_ids(self, ids, mask) -> jax.Array:
        """ids int `(batch, seq)`, mask `(batch, seq)` (1: token, 0: padding) -> float32
        `(batch, seq, d_model)`, zero where mask is 0."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        self.model.check_inputs(ids, mask)
        return _encode(self._graphdef, self._state, ids, mask.astype(np.int32))

    def __call__(self, prompts: list[str]) -> jax.Array:
        if self.tokenizer is None:
            raise ValueError("this TextEncoder has no tokenizer (the converted folder has no tokenizer/); "
                             "use encode_ids, or convert again with --tokenizer DIR")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [clean_prompt(p) for p in prompts] if self.clean else list(prompts)
        return self.encode_ids(*self.tokenizer(prompts))


def load_text_encoder(directory: str, *, text_len: int = TEXT_LEN, dtype=None, param_dtype=None) -> TextEncoder:
    """`TextEncoder` of a converted folder (its `tokenizer/` if present; else ids only)."""
    tokenizer_dir = os.path.join(directory, TOKENIZER_DIR)
    tokenizer = UMT5Tokenizer(tokenizer_dir, text_len) if os.path.isdir(tokenizer_dir) else None
    return TextEncoder(load_umt5(directory, dtype=dtype, param_dtype=param_dtype), tokenizer)
