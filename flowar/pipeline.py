"""Model + autoencoder -> images: the user-facing sampling pipelines' shared part, and FlowAR's pipeline."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae.diffusers_vae import DiffusersVAE

from .model import FlowAR

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
VAE_FOLDER = "vae"


def load_vae(path, *, map_location="cpu"):
    """A VAE from a diffusers folder (or hub id), or from MAR's ``kl16.ckpt``."""
    if str(path).endswith((".ckpt", ".pth", ".pt")):
        from vae.mar_kl16 import load_mar_kl16

        return load_mar_kl16(path, map_location=map_location)
    return DiffusersVAE.from_pretrained(str(path))


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def decode_output(decode, latents: torch.Tensor, output_type: str, *, latent, decode_batch: int = 32):
    """Decode ``latents`` in chunks with ``decode`` (-> images in [-1, 1]) into ``output_type``.

    "latent" returns ``latent`` as it is (FlowAR: the latents; VAR: the list of token maps), "pt" (B, 3, H, W)
    float in [0, 1] on the CPU, "np" (B, H, W, 3) uint8, "pil" a list of PIL images.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return latent
    owner = getattr(decode, "__self__", None)
    dtype = next(owner.parameters()).dtype if isinstance(owner, torch.nn.Module) else latents.dtype
    images = torch.cat([decode(chunk.to(dtype)).float() for chunk in latents.split(decode_batch)])
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


class ScaleWisePipeline:
    """What the FlowAR and VAR pipelines share: the generator, the autoencoder that decodes its samples
    (saved in the subfolder ``autoencoder_folder``), devices, output types and editing."""

    autoencoder_folder: str

    def __init__(self, model, autoencoder):
        # A pipeline is for inference: no dropout, no drop path, no codebook statistics updates (and
        # diffusers' from_pretrained leaves a VAE in training mode).
        self.model = model.eval()
        self.autoencoder = autoencoder.eval()

    @property
    def device(self) -> torch.device:
        return self.model.class_emb.weight.device

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        self.autoencoder.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, path) -> None:
        """The model's files in ``path`` and the autoencoder's folder in ``path/<autoencoder_folder>``."""
        self.model.save_pretrained(path)
        self.autoencoder.save_pretrained(Path(path) / self.autoencoder_folder)

    def inpaint(self, image, mask, class_label=None, *, generator=None, **kwargs):
        """Zero-shot in-/out-painting and class-conditional editing; see :func:`flowar.editing.inpaint`."""
        from .editing import inpaint

        return inpaint(self, image, mask, class_label, generator=generator, **kwargs)

    def _generate(self, class_labels, batch_size, output_type, autocast_dtype, decode_batch, sample_kwargs):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        with torch.no_grad():
            with autocast_context(self.device, autocast_dtype):  # the generator only, not the decoder
                decodable, latent = self._sample(class_labels, batch_size, sample_kwargs)
            return decode_output(self.autoencoder.decode, decodable, output_type, latent=latent,
                                 decode_batch=decode_batch)

    def _sample(self, class_labels, batch_size, sample_kwargs):
        """(what the autoencoder decodes, what output_type "latent" returns)."""
        raise NotImplementedError

    @classmethod
    def _autoencoder_source(cls, path, given, keyword: str):
        """``given`` (an object, folder or file), or else the ``autoencoder_folder`` saved beside the model."""
        if given is not None:
            return given
        folder = Path(path) / cls.autoencoder_folder
        if not folder.is_dir():
            raise FileNotFoundError(f"path {path} has no {cls.autoencoder_folder}/ folder; pass {keyword}=... explicitly")
        return folder


class FlowARPipeline(ScaleWisePipeline):
    """Class labels in, images out: FlowAR samples latents and the VAE decodes them."""

    autoencoder_folder = VAE_FOLDER

    @property
    def vae(self):
        return self.autoencoder

    @classmethod
    def from_pretrained(cls, path, *, vae=None, map_location="cpu") -> "FlowARPipeline":
        """Load ``path`` (model files, plus a ``vae/`` folder unless ``vae`` names or is another VAE)."""
        model = FlowAR.from_pretrained(path, map_location=map_location)
        vae = cls._autoencoder_source(path, vae, "vae")
        if isinstance(vae, (str, Path)):
            vae = load_vae(vae, map_location=map_location)
        return cls(model, vae.to(map_location))

    def __call__(self, class_labels=None, *, batch_size=None, output_type: str = "pil",
                 autocast_dtype: torch.dtype | None = None, decode_batch: int = 32, **sample_kwargs):
        """Generate images for ``class_labels`` (a list, or None with ``batch_size`` when unconditional).

        sample_kwargs go to :meth:`FlowAR.sample` (cfg, cfg_schedule, guidance_interval, steps, solver,
        schedule, generator, progress). output_type: "pil" (list of PIL images), "pt" ((B, 3, H, W)
        float in [0, 1]), "np" ((B, H, W, 3) uint8), "latent" (the sampled latents).
        autocast_dtype: e.g. torch.bfloat16 to run the networks under autocast (ODE state stays float64).
        """
        return self._generate(class_labels, batch_size, output_type, autocast_dtype, decode_batch, sample_kwargs)

    def _sample(self, class_labels, batch_size, sample_kwargs):
        latents = self.model.sample(class_labels, batch_size=batch_size, **sample_kwargs)
        return latents, latents
