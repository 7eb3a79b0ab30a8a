"""Convert a Wan2.1 VAE checkpoint (`Wan2.1_VAE.pth` with the original key names, or a diffusers
`vae/` folder: config.json + safetensors) into a `sparge_jax` checkpoint, streamed tensor by
tensor like the DiT (`convert.pipeline.convert_streamed`)."""

from __future__ import annotations

import re

from convert.pipeline import check_keys, convert_streamed
from convert.readers import open_checkpoint, sidecar_config
from convert.vae_keys import is_diffusers_vae, is_vae_checkpoint, vae_diffusers_to_original, vae_param_table

_REQUIRED = ("encoder.conv1.weight", "conv2.weight")


def vae_source_names(keys) -> dict[str, str]:
    """{original name: key in the file} of a VAE checkpoint in original or diffusers names."""
    keys = list(keys)
    if not is_diffusers_vae(keys):
        return {key: key for key in keys}
    names: dict[str, str] = {}
    for key, name in vae_diffusers_to_original(keys).items():
        if name in names:
            raise ValueError(f"checkpoint keys {names[name]!r} and {key!r} both map to {name!r}")
        names[name] = key
    return names


def _latent_stats(z_dim: int, sidecar: dict | None) -> dict:
    """latents_mean / latents_std from a diffusers VAE config.json, else Wan2.1's (z_dim 16 only)."""
    from sparge_jax.models.wan_vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    if sidecar and "latents_mean" in sidecar and "latents_std" in sidecar:
        return dict(latents_mean=tuple(sidecar["latents_mean"]), latents_std=tuple(sidecar["latents_std"]))
    if z_dim != len(WAN21_LATENTS_MEAN):
        raise ValueError(f"the VAE has z_dim {z_dim}, so Wan2.1's latent mean/std (16 channels) do not apply; "
                         "put its diffusers config.json (with latents_mean, latents_std) beside the checkpoint")
    return dict(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)


def infer_vae_config(shapes: dict[str, tuple[int, ...]], sidecar: dict | None = None):
    """The `WanVAEConfig` of a checkpoint from `{original key: torch shape}` (and, for the latent
    statistics, its diffusers config.json if any)."""
    from sparge_jax.models.wan_vae import WanVAEConfig

    if sidecar and sidecar.get("is_residual"):
        raise ValueError("config.json says is_residual=true (the Wan2.2 VAE); only the Wan2.1 VAE is supported")
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the VAE architecture: checkpoint lacks {missing}")
    base_dim, z_dim = shapes["encoder.conv1.weight"][0], shapes["conv2.weight"][0]
    resamples = sorted(int(m.group(1)) for k in shapes
                       if (m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.resample\.1\.weight", k)))
    if len(resamples) != 3 or resamples[0] < 1:
        raise ValueError(f"cannot infer the VAE architecture: expected 3 encoder downsamplers, found {resamples}")
    blocks = resamples[0]
    stage_out = [f"encoder.downsamples.{i * (blocks + 1) + blocks - 1}.residual.2.weight" for i in range(4)]
    absent = [k for k in stage_out if k not in shapes]
    if absent:
        raise ValueError(f"cannot infer the VAE architecture: checkpoint lacks {absent}")
    return WanVAEConfig(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=tuple(shapes[k][0] // base_dim for k in stage_out),
        num_res_blocks=blocks,
        temporal_downsample=tuple(f"encoder.downsamples.{r}.time_conv.weight" in shapes for r in resamples),
        **_latent_stats(z_dim, sidecar),
    )


def is_vae_input(path: str) -> bool:
    """True if the checkpoint at `path` (file or directory) holds a Wan VAE."""
    reader = open_checkpoint(path)
    try:
        return is_vae_checkpoint(reader.keys())
    finally:
        reader.close()


def convert_vae_checkpoint(input_path: str, output_dir: str, *, dtype: str = "fp32", progress: bool = True):
    """Convert the VAE at `input_path` into `output_dir` (`params/` + `config.json`, read by
    `sparge_jax.models.load_wan_vae`); returns the `WanVAEConfig`. Streams like
    `convert.pipeline.convert_checkpoint` and raises ValueError (writing nothing) on unknown,
    missing or mis-shaped keys. dtype: "fp32" (default; Wan runs its VAE in float32) or "bf16"."""
    sidecar = sidecar_config(input_path)

    def plan(reader):
        names = vae_source_names(reader.keys())
        shapes = {name: tuple(reader.shape(key)) for name, key in names.items()}
        config = infer_vae_config(shapes, sidecar)
        table = vae_param_table(config)
        check_keys(shapes, table, "the Wan2.1 VAE")
        return names, table, config

    return convert_streamed(input_path, output_dir, plan, dtype=dtype, progress=progress)
