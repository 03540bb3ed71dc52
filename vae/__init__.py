"""Latent autoencoders behind one small protocol, the MAR KL-16 import and the scale pyramid."""

from .diffusers_vae import DiffusersVAE
from .protocol import LatentAutoencoder
from .pyramid import area_pyramid, check_scales, next_scale_input

# Resolved on first use, so that `python -m vae.mar_kl16` does not find its module already imported.
_MAR_KL16 = (
    "KLArch",
    "MAR_KL16_SCALING",
    "mar_kl16_config",
    "convert_mar_kl16_state_dict",
    "load_mar_kl16",
    "convert_mar_kl16",
)


def __getattr__(name: str):
    if name in _MAR_KL16:
        from . import mar_kl16

        return getattr(mar_kl16, name)
    raise AttributeError(f"module 'vae' has no attribute {name!r}")


__all__ = [
    "LatentAutoencoder",
    "DiffusersVAE",
    *_MAR_KL16,
    "check_scales",
    "area_pyramid",
    "next_scale_input",
]
