"""Names and layouts of the Wan2.1 VAE's parameters, pure Python (no jax, no torch).

- original: `Wan2.1_VAE.pth` (`encoder.downsamples.N.residual.2.weight`, `decoder.head.0.gamma`, ...).
- diffusers: `AutoencoderKLWan` (`encoder.down_blocks.N.conv1.weight`, `decoder.norm_out.gamma`, ...).
- flax: paths of `sparge_jax.models.wan_vae.WanVAE` params (`encoder.downsamples.N.conv1.conv.kernel`, ...).

`vae_param_table(config)` lists every original key with its torch shape, flax path and layout
(`convert.keys.ParamSpec`); `config` is any object with `WanVAEConfig`'s fields.
"""

from __future__ import annotations

import re

from convert.keys import CONV, CONV2D, SAME, VECTOR, ParamSpec, rename_by_first_rule

# Keys whose presence marks a VAE checkpoint (original or diffusers names).
_VAE_MARKERS = ("decoder.conv1.weight", "decoder.conv_in.weight")


def _conv3d(table, original, flax, din, dout, kernel):
    table[f"{original}.weight"] = ParamSpec((dout, din, *kernel), f"{flax}.kernel", CONV)
    table[f"{original}.bias"] = ParamSpec((dout,), f"{flax}.bias", SAME)


def _conv2d(table, original, flax, din, dout, kernel):
    table[f"{original}.weight"] = ParamSpec((dout, din, kernel, kernel), f"{flax}.kernel", CONV2D)
    table[f"{original}.bias"] = ParamSpec((dout,), f"{flax}.bias", SAME)


def _residual(table, original, flax, din, dout):
    table[f"{original}.residual.0.gamma"] = ParamSpec((din, 1, 1, 1), f"{flax}.norm1.gamma", VECTOR)
    _conv3d(table, f"{original}.residual.2", f"{flax}.conv1.conv", din, dout, (3, 3, 3))
    table[f"{original}.residual.3.gamma"] = ParamSpec((dout, 1, 1, 1), f"{flax}.norm2.gamma", VECTOR)
    _conv3d(table, f"{original}.residual.6", f"{flax}.conv2.conv", dout, dout, (3, 3, 3))
    if din != dout:
        _conv3d(table, f"{original}.shortcut", f"{flax}.shortcut.conv", din, dout, (1, 1, 1))


def _middle(table, prefix, dim):
    _residual(table, f"{prefix}.middle.0", f"{prefix}.middle.0", dim, dim)
    table[f"{prefix}.middle.1.norm.gamma"] = ParamSpec((dim, 1, 1), f"{prefix}.middle.1.norm.gamma", VECTOR)
    _conv2d(table, f"{prefix}.middle.1.to_qkv", f"{prefix}.middle.1.to_qkv", dim, 3 * dim, 1)
    _conv2d(table, f"{prefix}.middle.1.proj", f"{prefix}.middle.1.proj", dim, dim, 1)
    _residual(table, f"{prefix}.middle.2", f"{prefix}.middle.2", dim, dim)


def _head(table, prefix, dim, dout):
    table[f"{prefix}.head.0.gamma"] = ParamSpec((dim, 1, 1, 1), f"{prefix}.norm_out.gamma", VECTOR)
    _conv3d(table, f"{prefix}.head.2", f"{prefix}.conv_out.conv", dim, dout, (3, 3, 3))


def vae_param_table(config) -> dict[str, ParamSpec]:
    """Every parameter of a Wan2.1 VAE with this config, keyed by its original name."""
    base, z, mult, blocks = config.base_dim, config.z_dim, config.dim_mult, config.num_res_blocks
    table: dict[str, ParamSpec] = {}
    dims = [base * m for m in (1, *mult)]
    _conv3d(table, "encoder.conv1", "encoder.conv_in.conv", 3, dims[0], (3, 3, 3))
    n = 0
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(blocks):
            _residual(table, f"encoder.downsamples.{n}", f"encoder.downsamples.{n}", din, dout)
            din, n = dout, n + 1
        if i < len(mult) - 1:
            _conv2d(table, f"encoder.downsamples.{n}.resample.1", f"encoder.downsamples.{n}.spatial", dout, dout, 3)
            if config.temporal_downsample[i]:
                _conv3d(table, f"encoder.downsamples.{n}.time_conv", f"encoder.downsamples.{n}.time_conv",
                        dout, dout, (3, 1, 1))
            n += 1
    _middle(table, "encoder", dims[-1])
    _head(table, "encoder", dims[-1], 2 * z)
    _conv3d(table, "conv1", "quant_conv.conv", 2 * z, 2 * z, (1, 1, 1))
    _conv3d(table, "conv2", "post_quant_conv.conv", z, z, (1, 1, 1))

    dims = [base * m for m in (mult[-1], *mult[::-1])]
    temporal = tuple(config.temporal_downsample)[::-1]
    _conv3d(table, "decoder.conv1", "decoder.conv_in.conv", z, dims[0], (3, 3, 3))
    _middle(table, "decoder", dims[0])
    n = 0
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            din //= 2
        for _ in range(blocks + 1):
            _residual(table, f"decoder.upsamples.{n}", f"decoder.upsamples.{n}", din, dout)
            din, n = dout, n + 1
        if i < len(mult) - 1:
            _conv2d(table, f"decoder.upsamples.{n}.resample.1", f"decoder.upsamples.{n}.spatial", dout, dout // 2, 3)
            if temporal[i]:
                _conv3d(table, f"decoder.upsamples.{n}.time_conv", f"decoder.upsamples.{n}.time_conv.conv",
                        dout, 2 * dout, (3, 1, 1))
            n += 1
    _head(table, "decoder", dims[-1], 3)
    return table


def is_vae_checkpoint(keys) -> bool:
    """True if the key set is a Wan VAE's (original or diffusers names)."""
    return any(marker in keys for marker in _VAE_MARKERS)


def is_diffusers_vae(keys) -> bool:
    return "decoder.conv_in.weight" in keys


_DIFFUSERS_PREFIXES = [
    (r"(en|de)coder\.conv_in\.", r"\1coder.conv1."),
    (r"quant_conv\.", "conv1."),
    (r"post_quant_conv\.", "conv2."),
    (r"(en|de)coder\.norm_out\.", r"\1coder.head.0."),
    (r"(en|de)coder\.conv_out\.", r"\1coder.head.2."),
    (r"(en|de)coder\.mid_block\.resnets\.0\.", r"\1coder.middle.0."),
    (r"(en|de)coder\.mid_block\.attentions\.0\.", r"\1coder.middle.1."),
    (r"(en|de)coder\.mid_block\.resnets\.1\.", r"\1coder.middle.2."),
    (r"encoder\.down_blocks\.", "encoder.downsamples."),
]
_DIFFUSERS_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                       "conv_shortcut": "shortcut"}


def _decoder_blocks(keys) -> int:
    """Residual blocks per diffusers decoder up block (num_res_blocks + 1)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    if not found:
        raise ValueError("diffusers VAE checkpoint lacks decoder.up_blocks.0.resnets.*")
    return max(found) + 1


def vae_diffusers_to_original(keys) -> dict[str, str]:
    """{diffusers key: original key} for the keys of a diffusers `AutoencoderKLWan` state dict;
    keys that match no rule map to themselves (they then show up as unknown keys)."""
    keys = list(keys)
    stride = _decoder_blocks(keys) + 1  # the residual blocks and the upsampler of one up block
    names = {}
    for key in keys:
        name = rename_by_first_rule(key, _DIFFUSERS_PREFIXES)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", name)
        if up:
            block, _, resnet, rest = up.groups()
            index = int(block) * stride + (stride - 1 if resnet is None else int(resnet))
            name = f"decoder.upsamples.{index}.{rest}"
        residual = re.match(r"((?:en|de)coder\.(?:downsamples|upsamples|middle)\.\d+)\.([a-z_0-9]+)\.(.*)", name)
        if residual and residual.group(2) in _DIFFUSERS_RESIDUAL:
            name = f"{residual.group(1)}.{_DIFFUSERS_RESIDUAL[residual.group(2)]}.{residual.group(3)}"
        names[key] = name
    return names
