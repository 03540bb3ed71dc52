"""The scale pyramid: targets by area pooling, next-scale inputs by bicubic up then area down."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_scales(scales) -> tuple[int, ...]:
    """Validate a pyramid of doubling sides that starts at 1, e.g. (1, 2, 4, 8, 16)."""
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] != 1 or any(b != 2 * a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must double from 1, e.g. (1, 2, 4, 8, 16); got {scales}")
    return scales


def area_pyramid(latent: torch.Tensor, scales) -> list[torch.Tensor]:
    """Targets per scale: the (B, C, H, W) latent area-pooled to each (s, s); the last is the latent."""
    scales = check_scales(scales)
    if latent.ndim != 4 or latent.shape[-1] != scales[-1] or latent.shape[-2] != scales[-1]:
        raise ValueError(
            f"latent must be (B, C, {scales[-1]}, {scales[-1]}) for scales {scales}, got {tuple(latent.shape)}"
        )
    return [F.interpolate(latent, size=(s, s), mode="area") if s != scales[-1] else latent for s in scales]


def next_scale_input(latent: torch.Tensor, *, full_side: int, next_side: int) -> torch.Tensor:
    """Input for the next scale from a (B, C, s, s) latent: bicubic up to full size, then area down.

    Going through the full resolution (rather than straight from s to the next side) is what the
    released FlowAR models were trained with.
    """
    full = F.interpolate(latent, size=(full_side, full_side), mode="bicubic")
    return F.interpolate(full, size=(next_side, next_side), mode="area")
