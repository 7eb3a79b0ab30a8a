"""Convert a Wan2.1 torch checkpoint into a `sparge_jax` checkpoint (Orbax params + config.json)."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
import threading

import numpy as np
from tqdm import tqdm

from convert.infer import infer_architecture
from convert.keys import IGNORED_KEY_PATTERN, is_diffusers_format, param_table, to_original_key
from convert.layout import torch_to_flax
from convert.partial import deferred_signals, finish_staging, interruptible, make_staging, remove_stale_staging
from convert.readers import open_checkpoint, sidecar_config
from sparge_jax.dtypes import dtype_named


# At most this many names per category in a key-mismatch error.
_LISTED = 30


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:_LISTED]) + more


def check_keys(shapes: dict[str, tuple[int, ...]], table: dict, model: str = "the Wan2.1 model") -> None:
    """Raise ValueError listing unknown, missing and mis-shaped keys (original names); `model`
    names what the checkpoint was checked against."""
    unknown = sorted(set(shapes) - set(table))
    missing = sorted(set(table) - set(shapes))
    misshaped = sorted(
        f"{k} {tuple(shapes[k])} (expected {table[k].shape})"
        for k in set(shapes) & set(table) if tuple(shapes[k]) != table[k].shape
    )
    if unknown or missing or misshaped:
        message = f"checkpoint does not match {model}"
        for title, items in (("unknown keys", unknown), ("missing keys", missing), ("mis-shaped keys", misshaped)):
            if items:
                message += _listing(title, items)
        raise ValueError(message)


def _set_nested(tree: dict, path: str, value) -> None:
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def resolve_config(shapes: dict, sidecar: dict | None, config=None):
    """The `WanConfig`: `config` (a `WAN_CONFIGS` name or a WanConfig) or inferred from shapes."""
    from sparge_jax.models.wan import WAN_CONFIGS, WanConfig

    if config is None:
        return WanConfig(**infer_architecture(shapes, sidecar))
    if isinstance(config, WanConfig):
        return config
    if config not in WAN_CONFIGS:
        raise ValueError(f"config must be one of {sorted(WAN_CONFIGS)}; got {config!r}")
    return WAN_CONFIGS[config]


def _source_names(keys: list[str]) -> dict[str, str]:
    """{original name: key in the file}, ignored keys left out."""
    diffusers = is_diffusers_format(keys)
    names: dict[str, str] = {}
    for key in keys:
        name = to_original_key(key, diffusers)
        if IGNORED_KEY_PATTERN.match(name):
            continue
        if name in names:
            raise ValueError(f"checkpoint keys {names[name]!r} and {key!r} both map to {name!r}")
        names[name] = key
    return names


# Raw file, inside the staging directory, that holds the converted tensors while Orbax writes them.
_STAGED_TENSORS = "tensors.staging"
_ALIGN = 64


def stage_tensors(reader, names: dict[str, str], table: dict, dtype, path: str,
                  progress: bool = False) -> tuple[dict, mmap.mmap]:
    """Read, re-lay out and cast each tensor of `table` in turn and append it to the raw file
    `path`; return the nested flax param dict whose leaves are read-only views of a memory map of
    that file, and that map. Only one tensor at a time is in anonymous memory; the rest is page
    cache, which the kernel can write back and drop (the caller deletes `path` when done with the
    params; `pages_dropped_while` keeps the map's pages out of the resident set)."""
    dtype = np.dtype(dtype)
    placed = []
    with open(path, "wb") as f:
        for name, spec in tqdm(table.items(), desc="converting", unit="tensor", disable=not progress):
            array = np.ascontiguousarray(torch_to_flax(reader.read(names[name]), spec.kind).astype(dtype, copy=False))
            f.write(b"\0" * (-f.tell() % _ALIGN))
            placed.append((spec.flax_path, f.tell(), array.shape))
            f.write(array.reshape(-1).view(np.uint8).data)
            del array
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapping, np.uint8)
    params: dict = {}
    for flax_path, offset, shape in placed:
        size = math.prod(shape) * dtype.itemsize
        _set_nested(params, flax_path, data[offset:offset + size].view(dtype).reshape(shape))
    return params, mapping


@contextlib.contextmanager
def pages_dropped_while(mapping: mmap.mmap, period: float = 0.02):
    """While the block runs, unmap the resident pages of the read-only file map `mapping` every
    `period` seconds (`MADV_DONTNEED`; a later read faults a page back in from the file, so the
    data seen never changes). Orbax reads each staged tensor once: without this, every page it
    read would stay in the converter's resident set until the end, one whole copy of the output.
    (No-op where madvise is unavailable.)"""
    if not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        yield
        return
    stop = threading.Event()

    def drop():
        while not stop.wait(period):
            mapping.madvise(mmap.MADV_DONTNEED)

    worker = threading.Thread(target=drop, name="staging-page-dropper", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def _chmod_like_mkdir(path: str) -> None:
    """Give `path` (made by `tempfile.mkdtemp`, mode 0700) the mode a plain `mkdir` would,
    under the process umask, so the finished output is not private to its writer."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def convert_checkpoint(input_path: str, output_dir: str, *, config=None, dtype: str = "bf16",
                       progress: bool = True):
    """Convert the checkpoint at `input_path` (file or directory; original or diffusers names;
    safetensors, sharded with an index, or .pth) into `output_dir` (`params/` Orbax checkpoint
    + `config.json`). Returns the `WanConfig`.

    Streams tensor by tensor: each is read, re-laid out, cast and appended to a raw staging file
    in the output's staging directory; Orbax then writes the params from a read-only memory map of
    that file (without its usual host copy), and the file is deleted. So the converter's anonymous
    memory stays small; measured on a 1.3B model in bf16 (2.84 GB) read from safetensors: peak
    RSS 3.1 GB of which 0.17 GB anonymous (before: 6.0 GB, 5.9 GB anonymous). The map's pages
    are dropped from the resident set while Orbax reads them (`pages_dropped_while`): converting
    a 228 MB bf16 checkpoint (2 shards) to fp32 (455 MB) raised the peak RSS by 82 MB instead of
    496 MB (tests/test_convert_memory.py holds it under 1.2x the larger shard plus the largest
    output array). Needs the output's size in extra disk space beside `output_dir` while it runs.

    config: a `WAN_CONFIGS` name or `WanConfig`; None infers it from the tensor shapes.
    dtype: stored param dtype, a name of `sparge_jax.dtypes` ("bf16" / "bfloat16", "fp32" / "float32").
    Raises ValueError (and writes nothing) on unknown, missing or mis-shaped keys. On any error,
    and on SIGINT/SIGTERM (raised as `convert.partial.Interrupted`; held back while Orbax
    writes, whose threads would otherwise go on writing), the staging directory is removed;
    staging directories of `output_dir` left by converters killed outright (kill -9) are
    removed, with a message, by the next conversion into it.
    """
    input_path = os.fspath(input_path)

    def plan(reader):
        names = _source_names(reader.keys())
        shapes = {name: tuple(reader.shape(key)) for name, key in names.items()}
        wan_config = resolve_config(shapes, sidecar_config(input_path), config)
        table = param_table(wan_config)
        check_keys(shapes, table)
        return names, table, wan_config

    return convert_streamed(input_path, output_dir, plan, dtype=dtype, progress=progress)


def convert_streamed(input_path: str, output_dir: str, plan, *, dtype: str = "bf16", progress: bool = True,
                     add_files=None):
    """The streaming conversion of `convert_checkpoint` for any model: `plan(reader)` returns
    `(names, table, config)`: {table key: key in the file}, the `ParamSpec` table (checked
    against the file's shapes already) and the config whose `to_dict()` goes to config.json.
    `add_files(staging_dir)`, when given, writes further files beside them (e.g. a tokenizer)
    before the output is published. Returns the config."""
    dtype_named(dtype)  # a ValueError naming the allowed names before anything is written
    from sparge_jax.models.checkpoint import check_new_output_dir

    input_path, output_dir = os.fspath(input_path), os.path.abspath(output_dir)
    check_new_output_dir(output_dir)
    with interruptible():
        return _convert(input_path, output_dir, plan, dtype, progress, add_files)


def _convert(input_path: str, output_dir: str, plan, dtype: str, progress: bool, add_files):
    from sparge_jax.models.checkpoint import save_wan_params

    reader = open_checkpoint(input_path)
    staging = None
    try:
        names, table, wan_config = plan(reader)
        os.makedirs(os.path.dirname(output_dir), exist_ok=True)
        remove_stale_staging(output_dir)
        staging = make_staging(output_dir)
        tensors = os.path.join(staging, _STAGED_TENSORS)
        params, mapping = stage_tensors(reader, names, table, dtype_named(dtype), tensors, progress)
        reader.close()
        with deferred_signals(), pages_dropped_while(mapping):
            save_wan_params(staging, params, wan_config)
        del params, mapping
        os.remove(tensors)
        if add_files is not None:
            add_files(staging)
        finish_staging(staging)
        _chmod_like_mkdir(staging)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.rename(staging, output_dir)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        reader.close()
    return wan_config
