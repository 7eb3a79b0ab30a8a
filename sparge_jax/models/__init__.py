"""Video diffusion transformers: the Wan2.1 DiT (`WanModel`), its VAE (`WanVAE`), its umT5 text
encoder (`UMT5Encoder`, `TextEncoder`) and their converted checkpoints."""

from sparge_jax.models.checkpoint import load_wan, load_wan_vae, read_wan_config, read_wan_vae_config, save_wan_params
from sparge_jax.models.text_encoder import TextEncoder, UMT5Tokenizer, load_text_encoder, load_umt5
from sparge_jax.models.umt5 import UMT5_CONFIGS, UMT5Config, UMT5Encoder
from sparge_jax.models.wan import WAN_CONFIGS, WanConfig, WanModel, preset_of
from sparge_jax.models.wan_vae import WanVAE, WanVAEConfig

__all__ = ["WAN_CONFIGS", "WanConfig", "WanModel", "preset_of", "load_wan", "read_wan_config", "save_wan_params",
           "UMT5_CONFIGS", "UMT5Config", "UMT5Encoder", "TextEncoder", "UMT5Tokenizer", "load_umt5",
           "load_text_encoder", "WanVAE", "WanVAEConfig", "load_wan_vae", "read_wan_vae_config"]
