"""What a pipeline hands back: decoding sampled latents into images of the requested type, grids, autocast,
and PNG files that carry the settings that made them."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from PIL import Image, PngImagePlugin

OUTPUT_TYPES = ("pil", "pt", "np", "latent", "sample")


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


# The precisions the command-line tools offer, as the generator's autocast dtype (None: float32 throughout).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def decode_output(autoencoder, sample, output_type: str, *, decode_batch: int = 32):
    """A model's sample (``SampleOutput`` / ``VARSampleOutput``) as ``output_type``.

    "sample" returns ``sample`` itself, to decode later (an application that times sampling and decoding
    apart); "latent" returns ``sample.latent_output`` (FlowAR: the latents; VAR: the list of token maps); otherwise
    ``sample.decoder_input`` is decoded in chunks of ``decode_batch`` in the autoencoder's own dtype: "pt"
    (B, 3, H, W) float in [0, 1] on the CPU, "np" (B, H, W, 3) uint8, "pil" a list of PIL images.
    """
    check_output_type(output_type)
    if output_type == "sample":
        return sample
    if output_type == "latent":
        return sample.latent_output
    dtype = next(autoencoder.parameters()).dtype
    latents = sample.decoder_input
    images = torch.cat([autoencoder.decode(chunk.to(dtype)).float() for chunk in latents.split(decode_batch)])
    if output_type == "pt":
        return ((images.clamp(-1, 1) + 1) / 2).cpu()
    pixels = to_uint8_images(images)
    if output_type == "np":
        return pixels
    return [Image.fromarray(p) for p in pixels]


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding to nearest."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int, *, pad: int = 2) -> Image.Image:
    """Tile (B, H, W, 3) uint8 images into one PIL image, ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
    count, height, width, _ = images.shape
    cols = max(1, min(nrow, count))
    rows = -(-count // cols)
    canvas = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        canvas[y:y + height, x:x + width] = img
    return Image.fromarray(canvas)


# The PNG text chunk that holds an image's settings (model, class, seed, sampling options) as JSON.
PNG_SETTINGS_KEY = "flowar"


def png_with_settings(image: np.ndarray, settings: dict) -> bytes:
    """(H, W, 3) uint8 as PNG bytes, ``settings`` (a JSON-able dict) in its text chunk ``PNG_SETTINGS_KEY``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_settings(source) -> dict | None:
    """The settings a PNG of ``png_with_settings`` carries (a path, bytes or file object); None without them."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        text = image.text.get(PNG_SETTINGS_KEY) if hasattr(image, "text") else None
    return None if text is None else json.loads(text)
