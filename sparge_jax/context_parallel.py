"""Context (sequence) parallelism, Ulysses style, read from the ambient mesh.

Under `jax.set_mesh(mesh)` with a mesh axis named "context" of size c > 1, the Wan model keeps
the token dimension of its activations sharded over that axis between blocks (`shard_tokens`),
and each self-attention runs `ulysses_attention`: inside `jax.shard_map`, an all-to-all turns
q, k, v `(batch, seq / c, heads, head_dim)` into `(batch, seq, heads / c, head_dim)`, the dense
or block-sparse core runs on full sequences of its heads (so per-head mask prediction is
local), and a second all-to-all turns the output back. The backward is JAX's transpose of the
all-to-alls. Everything else in a block (modulation, norms, cross-attention, FFN) is per token
and stays sequence-local under the sharding constraint. Without such a mesh nothing changes.

Mesh axis names: "context"; the batch dimension may also be sharded over "data" / "fsdp" and
the heads over "tensor" (the names of `train.sharding`), each where it divides.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from sparge_jax.method_config import HeadMix, LayerMethods, SVG2Method

CONTEXT_AXIS = "context"
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def context_mesh():
    """The ambient abstract mesh when it has a "context" axis of size > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or mesh.shape[CONTEXT_AXIS] == 1:
        return None
    return mesh


def context_degree() -> int:
    """Size of the ambient mesh's "context" axis (1 without one)."""
    mesh = context_mesh()
    return 1 if mesh is None else mesh.shape[CONTEXT_AXIS]


def _dividing(mesh, names: tuple[str, ...], size: int):
    """The mesh axes among `names` (size > 1) whose running product divides `size`, as a spec entry."""
    chosen = []
    for name in names:
        if name in mesh.axis_names and mesh.shape[name] > 1:
            if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[name]) == 0:
                chosen.append(name)
    return tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None)


def check_tokens(seq: int, degree: int) -> None:
    """ValueError unless the token count splits evenly over the context axis."""
    if seq % degree:
        raise ValueError(f"the token count ({seq} = frames * height * width after patching) must be divisible "
                         f"by the context-parallel degree mesh.context ({degree}); change the clip size or "
                         f"mesh.context")


def shard_tokens(x: jax.Array) -> jax.Array:
    """x `(batch, seq, ...)` constrained to have `seq` sharded over "context" (the other dims
    left to the partitioner); unchanged without a context mesh."""
    mesh = context_mesh()
    if mesh is None:
        return x
    check_tokens(x.shape[1], mesh.shape[CONTEXT_AXIS])
    spec = P(P.UNCONSTRAINED, CONTEXT_AXIS, *([P.UNCONSTRAINED] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)


def check_method(method) -> None:
    """ValueError for the methods that cannot run on a subset of the heads: `SVG2Method` (its
    k-means draws and centroid state span all heads) and `HeadMix` (head h's method is chosen
    by its global index)."""
    methods = [method.default, *(m for _, m in method.layers)] if isinstance(method, LayerMethods) else [method]
    for m in methods:
        if isinstance(m, HeadMix):
            raise ValueError("a HeadMix method is not supported with context parallelism (mesh.context > 1): "
                             "each device holds a slice of the heads after the all-to-all")
        if isinstance(m, SVG2Method):
            raise ValueError("SVG2Method is not supported with context parallelism (mesh.context > 1): its "
                             "k-means draws and centroid state are laid out over all heads")


def ulysses_attention(attend: Callable, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`attend(q, k, v)` on full sequences, with q, k, v `(batch, seq, heads, head_dim)`
    sequence-sharded over the ambient mesh's "context" axis; returns `(batch, seq, heads, head_dim)`
    sharded the same way. Without a context mesh: `attend(q, k, v)`.

    Raises ValueError when the heads or the token count do not divide by the context degree."""
    mesh = context_mesh()
    if mesh is None:
        return attend(q, k, v)
    degree = mesh.shape[CONTEXT_AXIS]
    batch, seq, heads, _ = q.shape
    if heads % degree:
        raise ValueError(f"num_heads ({heads}) must be divisible by the context-parallel degree mesh.context "
                         f"({degree})")
    check_tokens(seq, degree)
    if k.shape[1] != seq:
        raise ValueError(f"context parallelism runs self-attention only; got q length {seq}, k length {k.shape[1]}")
    spec = P(_dividing(mesh, BATCH_AXES, batch), CONTEXT_AXIS, _dividing(mesh, HEAD_AXES, heads // degree), None)

    def local(q, k, v):
        to_heads = lambda t: jax.lax.all_to_all(t, CONTEXT_AXIS, split_axis=2, concat_axis=1, tiled=True)
        out = attend(to_heads(q), to_heads(k), to_heads(v))
        return jax.lax.all_to_all(out, CONTEXT_AXIS, split_axis=1, concat_axis=2, tiled=True)

    # check_vma off: the kernels' loops start from fresh (unvarying) carries, which the
    # varying-manual-axes check would refuse; every value inside is per device anyway.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
