"""Wan2.1 torch checkpoints (original or diffusers names; safetensors or .pth) to sparge_jax
checkpoints, and back to the original format.

`convert.keys`, `convert.layout`, `convert.original` need only NumPy (+ safetensors to write);
`convert_checkpoint` (from `convert.pipeline`) also needs jax/orbax. CLI: `python -m convert`.
"""


def __getattr__(name):
    # Lazy, so the NumPy-only submodules import without jax.
    if name == "convert_checkpoint":
        from convert.pipeline import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module 'convert' has no attribute {name!r}")


__all__ = ["convert_checkpoint"]
