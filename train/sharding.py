"""Device mesh over (data, fsdp, context, tensor) and logical-axis rules that shard the Wan params.

Each parameter gets logical axis names from its path (`PARAM_AXES`); `LOGICAL_RULES` maps
logical names to mesh axes. A mesh axis is dropped from a dimension it does not divide,
so every parameter shape works on every mesh (small or odd dims are replicated).
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sparge_jax.context_parallel import BATCH_AXES, CONTEXT_AXIS
from train.config import MeshSettings
from train.optimizer import path_string

MESH_AXES = ("data", "fsdp", CONTEXT_AXIS, "tensor")

# logical axis -> mesh axes (None = replicated)
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp", CONTEXT_AXIS),  # ZeRO-3 over the context group too: it holds one copy of a clip's model
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
}

# (regex on the param path, logical axes per dim); first match wins. Linear kernels are
# (in, out): q/k/v and the first FFN layer split their output over `tensor` (column
# parallel), the attention output and second FFN layer split their input (row parallel);
# the model dim is split over `fsdp` and `context`.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn\w*/(q|k|v|k_img|v_img)/kernel$", ("embed", "heads")),
    (r"attn\w*/(q|k|v|k_img|v_img)/bias$", ("heads",)),
    (r"attn\w*/o/kernel$", ("heads", "embed")),
    (r"ffn/linear_1/kernel$", ("embed", "mlp")),
    (r"ffn/linear_1/bias$", ("mlp",)),
    (r"ffn/linear_2/kernel$", ("mlp", "embed")),
    (r"(norm\w*|scale)$", ("norm",)),
    (r"kernel$", ("embed", None)),
)


def make_mesh(settings: MeshSettings, devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, context, tensor); a -1 size takes the devices left over."""
    devices = jax.devices() if devices is None else devices
    sizes = [settings.data, settings.fsdp, settings.context, settings.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {tuple(sizes)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices; {len(devices)} are visible")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a parameter from its '/'-joined path; unmatched -> replicated."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec from logical axes through LOGICAL_RULES, keeping only the mesh axes (of
    size > 1) whose product divides the dimension and that no earlier dimension used."""
    used: set[str] = set()
    entries = []
    for dim, name in zip(shape, axes):
        chosen: list[str] = []
        for axis in (LOGICAL_RULES.get(name) or ()) if name else ():
            size = mesh.shape[axis]
            if size > 1 and axis not in used and dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        entries.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*entries)


def param_shardings(params, mesh: Mesh):
    """Pytree like `params` (arrays or ShapeDtypeStructs) of NamedShardings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(x.shape, logical_axes(path_string(path), len(x.shape)), mesh)),
        params,
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Shard dimension `batch_dim` over (data, fsdp); the rest replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """Number of batch shards: a micro-batch must be a multiple of it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
