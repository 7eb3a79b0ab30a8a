"""Logical-axis rules of the Wan params and their PartitionSpecs on (data, fsdp, context, tensor) meshes."""

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from train.config import MeshSettings
from train.sharding import MESH_AXES, logical_axes, make_mesh, spec_for


def mesh(data, fsdp, tensor, context=1):
    return AbstractMesh((data, fsdp, context, tensor), MESH_AXES)


@pytest.mark.parametrize(
    "path,ndim,axes",
    [
        ("blocks/3/self_attn/q/kernel", 2, ("embed", "heads")),
        ("blocks/3/ffn/linear_1/kernel", 2, ("embed", "mlp")),
        ("blocks/3/ffn/linear_2/kernel", 2, ("mlp", "embed")),
        ("blocks/3/cross_attn/v_img/kernel", 2, ("embed", "heads")),
        ("blocks/3/self_attn/o/kernel", 2, ("heads", "embed")),
        ("blocks/3/self_attn/k/bias", 1, ("heads",)),
        ("blocks/0/self_attn/norm_q/scale", 1, ("norm",)),
        ("head/head/kernel", 2, ("embed", None)),
        ("blocks/1/modulation", 3, (None, None, None)),
    ],
)
def test_logical_axes_from_paths(path, ndim, axes):
    assert logical_axes(path, ndim) == axes


def test_specs_shard_divisible_dims_and_replicate_the_rest():
    m = mesh(1, 2, 4)
    assert spec_for((64, 128), ("embed", "heads"), m) == P("fsdp", "tensor")
    assert spec_for((128, 64), ("heads", "embed"), m) == P("tensor", "fsdp")
    assert spec_for((63, 128), ("embed", "heads"), m) == P(None, "tensor"), "63 is not divisible by fsdp=2"
    assert spec_for((64, 6), ("embed", "heads"), m) == P("fsdp", None), "6 is not divisible by tensor=4"
    assert spec_for((8, 3, 5), ("batch", None, None), mesh(2, 2, 1)) == P(("data", "fsdp"), None, None)
    assert spec_for((6, 3), ("batch", None), mesh(4, 2, 1)) == P("fsdp", None), "6 % 4 != 0: only fsdp fits"
    assert spec_for((64,), ("norm",), m) == P(None)
    assert spec_for((64, 128), ("embed", "heads"), mesh(1, 2, 2, context=4)) == P(("fsdp", "context"), "tensor")
    assert spec_for((4, 128), ("embed", "heads"), mesh(1, 2, 2, context=4)) == P("fsdp", "tensor"), "4 % 8 != 0"
    assert spec_for((64, 64), ("embed", "heads"), mesh(1, 1, 1)) == P(None, None)


def test_mesh_sizes_are_checked():
    assert dict(make_mesh(MeshSettings(1, -1, 1)).shape) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(MeshSettings(2, 2, 1))
