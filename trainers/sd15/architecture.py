"""Stable Diffusion 1.5 architecture configs, shipped as data so loading never touches the Hub.

Two sizes share one layout:

- ``full``: the real SD1.5 shapes (860M-parameter UNet, KL VAE, CLIP ViT-L/14 text encoder).
- ``tiny``: the same block structure with small widths, for fast tests. It keeps the real CLIP
  vocabulary and 77 positions so the real tokenizer drives it, and it keeps 4 VAE levels so
  latents are 1/8 of the image size, as in SD1.5.

Some hyper-parameters cannot be read back from weight shapes (attention heads, GroupNorm
groups). Both sizes follow the same conventions for those (8 UNet heads, 32 groups, CLIP heads
from :func:`clip_num_heads`), so a config inferred from a checkpoint's shapes is exact for both.

Every accessor returns a fresh copy; callers may modify it.
"""

from __future__ import annotations

import copy
from typing import Any

SIZES = ("full", "tiny")

# UNet attention heads in every SD1.5-family UNet. diffusers calls this ``attention_head_dim``
# for historical reasons; for SD1.5 it is the number of heads. ComfyUI also assumes 8.
UNET_NUM_HEADS = 8
# GroupNorm groups in the UNet and the VAE.
NORM_NUM_GROUPS = 32

_UNET_FULL: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": NORM_NUM_GROUPS,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "transformer_layers_per_block": 1,
    "attention_head_dim": UNET_NUM_HEADS,
    "use_linear_projection": False,
    "upcast_attention": False,
}

_UNET_TINY: dict[str, Any] = {
    **_UNET_FULL,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
}

_VAE_FULL: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": NORM_NUM_GROUPS,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_VAE_TINY: dict[str, Any] = {
    **_VAE_FULL,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "sample_size": 64,
}

# CLIP ViT-L/14 text tower as used by SD1.5. Token ids are the real ones of the CLIP BPE vocab
# (<|startoftext|> = 49406, <|endoftext|> = 49407, padding with <|endoftext|>).
_CLIP_FULL: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

_CLIP_TINY: dict[str, Any] = {
    **_CLIP_FULL,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}

# The DDPM training schedule of SD1.5 (the ``scheduler`` folder of the diffusers release, as a
# DDPMScheduler): scaled-linear betas from 0.00085 to 0.012 over 1000 steps, epsilon prediction.
_NOISE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

# Text encoder sequence length of SD1.5 (CLIP's 77 positions, including BOS and EOS).
MAX_TOKEN_LENGTH = 77


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def unet_config(size: str = "full") -> dict[str, Any]:
    """Keyword arguments of ``diffusers.UNet2DConditionModel`` for SD1.5."""
    _check_size(size)
    return copy.deepcopy(_UNET_FULL if size == "full" else _UNET_TINY)


def vae_config(size: str = "full") -> dict[str, Any]:
    """Keyword arguments of ``diffusers.AutoencoderKL`` for SD1.5."""
    _check_size(size)
    return copy.deepcopy(_VAE_FULL if size == "full" else _VAE_TINY)


def text_encoder_config(size: str = "full") -> dict[str, Any]:
    """Keyword arguments of ``transformers.CLIPTextConfig`` for SD1.5."""
    _check_size(size)
    return copy.deepcopy(_CLIP_FULL if size == "full" else _CLIP_TINY)


def noise_scheduler_config() -> dict[str, Any]:
    """Keyword arguments of ``diffusers.DDPMScheduler`` for SD1.5 training."""
    return copy.deepcopy(_NOISE_SCHEDULER)


def controlnet_config(size: str = "full") -> dict[str, Any]:
    """Keyword arguments of ``diffusers.ControlNetModel`` matching the SD1.5 UNet."""
    unet = unet_config(size)
    keep = (
        "in_channels",
        "flip_sin_to_cos",
        "freq_shift",
        "down_block_types",
        "mid_block_type",
        "only_cross_attention",
        "block_out_channels",
        "layers_per_block",
        "downsample_padding",
        "mid_block_scale_factor",
        "act_fn",
        "norm_num_groups",
        "norm_eps",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "use_linear_projection",
        "upcast_attention",
    )
    config = {key: unet[key] for key in keep}
    config["conditioning_channels"] = 3
    return config


def clip_num_heads(hidden_size: int) -> int:
    """Attention heads of a CLIP text tower of this width (64-dim heads, 8-dim below 64)."""
    if hidden_size == _CLIP_FULL["hidden_size"]:
        return _CLIP_FULL["num_attention_heads"]
    if hidden_size == _CLIP_TINY["hidden_size"]:
        return _CLIP_TINY["num_attention_heads"]
    if hidden_size % 64 == 0:
        return hidden_size // 64
    return max(1, hidden_size // 8)
