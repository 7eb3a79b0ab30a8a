"""Video diffusion transformers: the Wan2.1 DiT (`WanModel`) and its converted checkpoints."""

from sparge_jax.models.checkpoint import load_wan, read_wan_config, save_wan_params
from sparge_jax.models.wan import WAN_CONFIGS, WanConfig, WanModel, preset_of

__all__ = ["WAN_CONFIGS", "WanConfig", "WanModel", "preset_of", "load_wan", "read_wan_config", "save_wan_params"]
