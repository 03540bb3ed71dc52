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


def grid_shape(size) -> tuple[int, int]:
    """(height, width) of a scale given as a side ``s`` (an s x s grid) or as (height, width)."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def token_count(size) -> int:
    """Tokens of a scale given as a side or as (height, width)."""
    height, width = grid_shape(size)
    return height * width


def _scale_size(entry):
    """An entry of a scale list as a side (square) or (height, width) of positive integers, else None."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry if entry > 0 else None
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry):
        return entry[0] if entry[0] == entry[1] else (entry[0], entry[1])
    return None


def check_scale_list(scales, *, name: str = "scales", grids: bool = False) -> tuple:
    """Validate any increasing list of sides that starts at 1, e.g. (1, 2, 3, 5, 8): a flexible model's
    scales (the first is the class token's scale, so its side is 1).

    With ``grids``, an entry may also be a (height, width) pair for a grid that is not square, e.g.
    (1, 2, 4, (8, 12)); each scale is then at least as high and as wide as the one before it and holds more
    tokens. A square pair is returned as its side, so square lists are lists of integers either way."""
    allowed = ("increasing integer sides or (height, width) pairs" if grids else "increasing integer sides")
    example = "(1, 2, 4, (8, 12))" if grids else "(1, 2, 3, 5, 8)"
    try:
        values = tuple(scales)
    except TypeError:
        raise ValueError(f"{name} must be a list of {allowed} starting at 1, got {scales!r}") from None
    sizes = tuple(_scale_size(entry) for entry in values)
    shapes = [grid_shape(size) for size in sizes if size is not None]
    if (not values or None in sizes or (not grids and any(not isinstance(size, int) for size in sizes))
            or sizes[0] != 1 or any(b[0] < a[0] or b[1] < a[1] or b == a for a, b in zip(shapes, shapes[1:]))):
        raise ValueError(f"{name} must be a list of {allowed} starting at 1, e.g. {example}; got {scales!r}")
    return sizes


def scale_text(size) -> str:
    """A scale as text: its side, or HEIGHTxWIDTH for a grid that is not square (what ``parse_scale_list`` reads)."""
    height, width = grid_shape(size)
    return str(height) if height == width else f"{height}x{width}"


def parse_scale_list(text: str) -> tuple:
    """A scale list written as text: comma-separated sides, a grid that is not square as HEIGHTxWIDTH, e.g.
    "1,2,4,8,12" or "1,2,4,8x12" -> (1, 2, 4, (8, 12)). Only the spelling is checked here; the sampling options
    check the list against the model."""
    sizes = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        height, sep, width = part.lower().partition("x")
        try:
            sizes.append((int(height), int(width)) if sep else int(part))
        except ValueError:
            raise ValueError(f"scales must be comma-separated sides, a grid that is not square as HEIGHTxWIDTH, "
                             f"e.g. 1,2,4,8,12 or 1,2,4,8x12; got {text!r}") from None
    return tuple(sizes)


def area_pyramid(latent: torch.Tensor, scales) -> list[torch.Tensor]:
    """Targets per scale: the (B, C, H, W) latent area-pooled to each scale's grid; the last is the latent. Any
    increasing list of sides from 1, or of (height, width) grids (``check_scale_list``); the released models'
    double."""
    scales = check_scale_list(scales, grids=True)
    last = grid_shape(scales[-1])
    if latent.ndim != 4 or tuple(latent.shape[-2:]) != last:
        raise ValueError(
            f"latent must be (B, C, {last[0]}, {last[1]}) for scales {scales}, got {tuple(latent.shape)}"
        )
    return [F.interpolate(latent, size=grid_shape(s), mode="area") if s != scales[-1] else latent for s in scales]


def next_scale_input(latent: torch.Tensor, *, full_side, next_side) -> torch.Tensor:
    """Input for the next scale from a (B, C, h, w) latent: bicubic up to full size, then area down; the sizes
    are sides or (height, width) grids.

    Going through the full resolution (rather than straight from s to the next side) is what the
    released FlowAR models were trained with.
    """
    full = F.interpolate(latent, size=grid_shape(full_side), mode="bicubic")
    return F.interpolate(full, size=grid_shape(next_side), mode="area")


# How an editing mask is taken to each scale's side (see scale_masks).
MASK_RESIZE = ("area", "bilinear")


def scale_masks(mask: torch.Tensor, scales, *, mask_resize: str = "area", keep_scales: int = 0) -> list[torch.Tensor]:
    """Boolean keep maps (B, h, w), one per scale: ``mask`` (B, 1, H, W) resized to the scale's grid, above 0.5.

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
            maps.append(torch.ones((mask.shape[0], *grid_shape(side)), dtype=torch.bool))
            continue
        if mask_resize == "area":
            resized = F.interpolate(mask, size=grid_shape(side), mode="area")
        else:
            resized = F.interpolate(mask, size=grid_shape(side), mode="bilinear", align_corners=False)
        maps.append(resized[:, 0] > 0.5)
    return maps
