"""Zero-shot in-painting, out-painting and class-conditional editing for FlowAR, VAR and xAR, behind one API.

Neither model is trained for it. The image is encoded, and after each scale is sampled the part of it that
the mask keeps is overwritten with the image's own content at that scale, so every later scale is
generated in the context of the known region (the VAR paper's "zero-shot task generalization"; the authors'
demo notebook ``demo_zero_shot_edit.ipynb``):

- VAR: the image's ground-truth token maps come from the tokenizer; after scale k's ids are drawn, the
  kept positions get the ground-truth ids, and f_hat (hence the next scale's input) is accumulated from
  the merged ids.
- FlowAR: the image's latent is area-pooled to every scale (``vae.pyramid.area_pyramid``, the training
  targets). While the head's ODE runs, the kept tokens are held on the straight path
  ``(1 - t) x_gt + t eps`` from the same eps the scale's ODE starts from, so the head conditions the
  generated tokens on the known ones at every step (see ``heads.flow.KnownRegionNet``); at the end of
  the scale they are exactly the ground truth, and the next scale's input is made from the merged map.
- xAR: its steps are cells of one latent, not scales of a pyramid, so the mask is resized once to the
  latent's side and each cell keeps its own piece (``XAR.edit_masks``). While a cell is integrated its kept
  tokens are held on the same straight path, from the cell's own initial noise, at every time the SDE or ODE
  solver reaches; they end exactly on the image's latent, and the merged cell is the next cell's clean
  context. A cell kept whole is not integrated at all.

Each family says where and what is known at each scale (``edit_masks``, ``known_regions``); the sampling
itself is one call of the engine (``flowar.sampling.generate``) with an edit hook.

Masks: 1 (or True) keeps the image, 0 generates. A mask is resized to each scale's side (``mask_resize``:
"area", the share of kept pixels in each cell, or "bilinear", as the authors' demo does) and a cell is kept
where the resized value is above 0.5 (xAR: resized to the latent's side). Out-painting: keep the centre; in-painting: keep all but a hole;
class-conditional editing: keep all but a region and give a new ``class_label``. Without a class label the
null class is used (the authors' in-painting setting: "no class label information").
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vae.pyramid import MASK_RESIZE, scale_masks

from .outputs import autocast_context, check_output_type, decode_output
from .sampling import generate

# The mask rules of vae.pyramid are re-exported: they are part of editing's API.
__all__ = ["MASK_RESIZE", "box_mask", "inpaint", "prepare_images", "prepare_mask", "scale_masks"]



# ---------------------------------------------------------------------------------------------- inputs
def prepare_images(image, side: int) -> torch.Tensor:
    """Images -> (B, 3, side, side) float32 in [-1, 1].

    image: a PIL image or a list of them; a uint8 array (H, W, 3) or (B, H, W, 3); a tensor (3, H, W) or
    (B, 3, H, W), uint8 in [0, 255] or float in [0, 1] (what ``output_type="pt"`` returns).
    """
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(i, Image.Image) for i in image):
            raise ValueError("image must be a PIL image, a list of PIL images, a uint8 array or a tensor")
        if len({i.size for i in image}) != 1:
            raise ValueError(f"image must be a list of equally sized images, got sizes {sorted({i.size for i in image})}")
        image = np.stack([np.asarray(i.convert("RGB")) for i in image])
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"image arrays must be uint8 (H, W, 3) or (B, H, W, 3), got {image.dtype} {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).movedim(-1, -3)
    if not torch.is_tensor(image):
        raise ValueError(f"image must be a PIL image, a list of PIL images, a uint8 array or a tensor, "
                         f"got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image tensors must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if tuple(image.shape[-2:]) != (side, side):
        raise ValueError(f"image must be {side}x{side} pixels for this model, got {image.shape[-1]}x{image.shape[-2]}")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif image.is_floating_point():
        image = image.float()
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError("image tensors of floats must lie in [0, 1] (as output_type='pt' returns them)")
    else:
        raise ValueError(f"image tensors must be uint8 or float, got {image.dtype}")
    return image * 2 - 1


def prepare_mask(mask, sides: tuple[int, ...]) -> torch.Tensor:
    """A keep mask -> (B, 1, h, w) float32 in [0, 1] (1 = keep the image, 0 = generate).

    mask: a PIL image (read as 8-bit, white = keep), or a bool / number array or tensor with values in
    [0, 1], of shape (h, w), (B, h, w) or (B, 1, h, w); (h, w) is one of ``sides`` squared (the image's
    pixels or the latent's).
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255
    if isinstance(mask, np.ndarray):
        if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.number)):
            raise ValueError(f"mask must hold bools or numbers, got dtype {mask.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a PIL image, an array or a tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise ValueError(f"mask must hold bools or real numbers, got {mask.dtype}")
    mask = mask.detach().cpu().to(torch.float32)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] < 1:
        raise ValueError(f"mask must be (h, w), (B, h, w) or (B, 1, h, w), got {tuple(mask.shape)}")
    if mask.shape[-1] != mask.shape[-2] or mask.shape[-1] not in sides:
        allowed = " or ".join(f"{s}x{s}" for s in sides)
        raise ValueError(f"mask must be {allowed} (the image's pixels or the latent's), got "
                         f"{mask.shape[-2]}x{mask.shape[-1]}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in [0, 1] (1 = keep, 0 = generate), got values in "
                         f"[{mask.min().item()}, {mask.max().item()}]; divide an 8-bit mask by 255")
    return mask


def _batch_sizes(images: int, masks: int, labels: int | None) -> int:
    sizes = {n for n in (images, masks, labels) if n is not None}
    batch = max(sizes)
    if sizes - {1, batch}:
        raise ValueError(f"image ({images}), mask ({masks}) and class_label ({labels}) batch sizes must be equal "
                         "or 1 (broadcast)")
    return batch


def _expand(x, batch: int):
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x


# ---------------------------------------------------------------------------------------------- the API
@torch.no_grad()
def inpaint(pipeline, image, mask, class_label=None, *, generator: torch.Generator | None = None,
            output_type: str = "pil", mask_resize: str = "area", keep_scales: int = 0,
            autocast_dtype: torch.dtype | None = None, decode_batch: int = 32, **sample_kwargs):
    """Regenerate the part of ``image`` where ``mask`` is 0, keeping the part where it is 1.

    pipeline: a FlowARPipeline, a VARPipeline (or FlexVAR's) or an XARPipeline. image: see :func:`prepare_images`
    (its size must be the model's); mask: see :func:`prepare_mask`, at the image's or the latent's resolution.
    class_label: an int, a list (one per image), or None (the null class: no class information; an
    unconditional model takes only None). Image, mask and labels broadcast from a batch of 1. mask_resize /
    keep_scales: see ``vae.pyramid.scale_masks`` (xAR: ``XAR.edit_masks``, keep_scales counting cells).
    sample_kwargs: the model's sampling options (guidance_scale, steps, top_k, ...).
    Returns images as the pipeline's ``__call__`` does for ``output_type`` ("latent": FlowAR or xAR latents
    or VAR token maps). A mask of all ones returns the autoencoder's reconstruction of the image; a mask of
    all zeros is ordinary sampling, equal to the pipeline's with the same generator.
    """
    model, autoencoder = getattr(pipeline, "model", None), getattr(pipeline, "autoencoder", None)
    if not hasattr(model, "known_regions") or autoencoder is None:
        raise ValueError(f"pipeline must be a FlowARPipeline, a VARPipeline or an XARPipeline, got "
                         f"{type(pipeline).__name__}")
    check_output_type(output_type)
    latent_side = model.latent_side
    side = latent_side * autoencoder.downsample
    images = prepare_images(image, side)
    masks = prepare_mask(mask, (side, latent_side))
    labels = None
    if class_label is not None:
        labels = torch.as_tensor(class_label).reshape(-1)
    batch = _batch_sizes(images.shape[0], masks.shape[0], None if labels is None else labels.numel())
    images, masks = _expand(images, batch), _expand(masks, batch)
    if labels is not None:
        labels = _expand(labels, batch)
    keep = model.edit_masks(masks, mask_resize=mask_resize, keep_scales=keep_scales)
    dtype = next(autoencoder.parameters()).dtype
    device = pipeline.device
    with torch.no_grad():
        # The image is encoded in the autoencoder's own precision; autocast is for the generator only.
        known = model.known_regions(autoencoder, images.to(device, dtype), keep)
        with autocast_context(device, autocast_dtype):
            sample = generate(model, labels, autoencoder=autoencoder, batch_size=batch, generator=generator,
                              edit=known.__getitem__, null_labels=True, **sample_kwargs)
    return decode_output(autoencoder, sample, output_type, decode_batch=decode_batch)


def box_mask(side: int, top: float, left: float, bottom: float, right: float, *, keep_inside: bool) -> torch.Tensor:
    """A (side, side) mask from a box given as fractions of the image (0..1): 1 inside the box when
    ``keep_inside`` (out-painting around it), else 1 outside it (in-painting or editing the box)."""
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
        raise ValueError(f"box must satisfy 0 <= top < bottom <= 1 and 0 <= left < right <= 1, got "
                         f"{(top, left, bottom, right)}")
    inside = torch.zeros(side, side)
    inside[round(top * side):round(bottom * side), round(left * side):round(right * side)] = 1
    return inside if keep_inside else 1 - inside
