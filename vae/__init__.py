"""Latent autoencoders behind one small protocol, the MAR KL-16 import and the scale pyramid."""

from .diffusers_vae import DiffusersVAE
from .mar_kl16 import (
    KLArch,
    MAR_KL16_SCALING,
    convert_mar_kl16,
    convert_mar_kl16_state_dict,
    load_mar_kl16,
    mar_kl16_config,
)
from .protocol import LatentAutoencoder
from .pyramid import area_pyramid, check_scales, next_scale_input

__all__ = [
    "LatentAutoencoder",
    "DiffusersVAE",
    "KLArch",
    "MAR_KL16_SCALING",
    "mar_kl16_config",
    "convert_mar_kl16_state_dict",
    "load_mar_kl16",
    "convert_mar_kl16",
    "check_scales",
    "area_pyramid",
    "next_scale_input",
]
