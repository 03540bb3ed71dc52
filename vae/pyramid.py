"""The scale pyramid: targets by area pooling, next-scale inputs by bicubic up then area down, and an editing
mask taken to every scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_scales(scales) -> tuple[int, ...]:
    """Validate a pyramid of doubling sides that starts at 1, e.g. (1, 2, 4, 8, 16)."""
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] != 1 or any(b != 2 * a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must double from 1, e.g. (1, 2, 4, 8, 16); got {scales}")
    return scales


def check_scale_list(scales, *, name: str = "scales") -> tuple[int, ...]:
    """Validate any increasing list of sides that starts at 1, e.g. (1, 2, 3, 5, 8): a flexible model's
    scales (the first is the class token's scale, so its side is 1)."""
    try:
        values = tuple(scales)
    except TypeError:
        raise ValueError(f"{name} must be a list of increasing integer sides starting at 1, got {scales!r}") from None
    if (not values or any(isinstance(s, bool) or not isinstance(s, int) for s in values) or values[0] != 1
            or any(b <= a for a, b in zip(values, values[1:]))):
        raise ValueError(f"{name} must be a list of increasing integer sides starting at 1, e.g. (1, 2, 3, 5, 8); "
                         f"got {scales!r}")
    return values


def area_pyramid(latent: torch.Tensor, scales) -> list[torch.Tensor]:
    """Targets per scale: the (B, C, H, W) latent area-pooled to each (s, s); the last is the latent. Any
    increasing list of sides from 1 (``check_scale_list``); the released models' double."""
    scales = check_scale_list(scales)
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


# How an editing mask is taken to each scale's side (see scale_masks).
MASK_RESIZE = ("area", "bilinear")


def scale_masks(mask: torch.Tensor, scales, *, mask_resize: str = "area", keep_scales: int = 0) -> list[torch.Tensor]:
    """Boolean keep maps (B, s, s), one per scale: ``mask`` (B, 1, h, w) resized to s, above 0.5.

    The first ``keep_scales`` scales are kept whole (the authors' demo keeps the 1x1 scale:
    ``keep_scales=1`` with ``mask_resize="bilinear"`` reproduces its rule for the released scales).
    """
    if mask_resize not in MASK_RESIZE:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE}, got {mask_resize!r}")
    if isinstance(keep_scales, bool) or not isinstance(keep_scales, int) or not 0 <= keep_scales <= len(scales):
        raise ValueError(f"keep_scales must be an integer in [0, {len(scales)}], got {keep_scales!r}")
    maps = []
    for k, side in enumerate(scales):
        if k < keep_scales:
            maps.append(torch.ones((mask.shape[0], side, side), dtype=torch.bool))
            continue
        if mask_resize == "area":
            resized = F.interpolate(mask, size=(side, side), mode="area")
        else:
            resized = F.interpolate(mask, size=(side, side), mode="bilinear", align_corners=False)
        maps.append(resized[:, 0] > 0.5)
    return maps
