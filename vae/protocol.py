"""The one interface the generators see: images in [-1, 1] to scaled latents and back."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LatentAutoencoder(Protocol):
    """An image autoencoder whose latents are already scaled for the generator (about unit std)."""

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, latent_channels, H / downsample, W / downsample)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) scaled latents -> (B, 3, h * downsample, w * downsample) in [-1, 1]."""
        ...

    @property
    def latent_channels(self) -> int:
        """Channels of one latent pixel (one token of the generator)."""
        ...

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along each side, e.g. 16."""
        ...

    @property
    def scaling_factor(self) -> float:
        """Multiplies the shifted raw latent: ``scaled = (raw - shift_factor) * scaling_factor`` (a diffusers VAE
        may also normalise each channel, see ``vae.diffusers_vae``)."""
        ...

    @property
    def shift_factor(self) -> float:
        """Subtracted from the raw latent before scaling; 0 for most autoencoders."""
        ...


def mean_latents(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """The scaled latents of ``images`` without sampling: the posterior mean where the autoencoder has a posterior
    (``encode_distribution``), else its ``encode``; float32. What editing holds fixed: a known region must not
    change with the posterior's noise."""
    if hasattr(autoencoder, "encode_distribution"):
        return autoencoder.encode_distribution(images)[0].float()
    return autoencoder.encode(images).float()
