"""Model + autoencoder -> images: the pipeline base shared by both families, and FlowAR's pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from vae.diffusers_vae import DiffusersVAE
from vae.files import read_class_names, write_class_names

from .editing import inpaint
from .model import FlowAR
from .outputs import autocast_context, check_output_type, decode_output
from .sampling import generate

VAE_FOLDER = "vae"


def load_vae(path, *, map_location="cpu"):
    """A VAE from a diffusers folder (or hub id), or from MAR's ``kl16.ckpt``."""
    if str(path).endswith((".ckpt", ".pth", ".pt")):
        from vae.mar_kl16 import load_mar_kl16

        return load_mar_kl16(path, map_location=map_location)
    return DiffusersVAE.from_pretrained(str(path))


class ScaleWisePipeline:
    """Class labels in, images out: a scale-wise model (FlowAR or VAR) samples, its autoencoder decodes.

    A family's pipeline sets ``model_class``, ``autoencoder_folder`` (the subfolder its autoencoder is saved
    in, also the name of the keyword that replaces it) and :meth:`load_autoencoder`.
    """

    model_class: type
    autoencoder_folder: str

    def __init__(self, model, autoencoder, *, class_names: list[str] | None = None):
        # A pipeline is for inference: no dropout, no drop path, no codebook statistics updates (and
        # diffusers' from_pretrained leaves a VAE in training mode).
        self.model = model.eval()
        self.autoencoder = autoencoder.eval()
        if class_names is not None and len(class_names) != model.config.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for a model of {model.config.num_classes} classes")
        self.class_names = None if class_names is None else [str(n) for n in class_names]

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        self.autoencoder.to(device=device, dtype=dtype)
        return self

    def compile(self, *, mode: str | None = None, dynamic: bool | None = None):
        """Compile the generator's sampling hot spots in place (``ScaleWiseModel.compile_for_sampling``); the
        first call afterwards compiles, later ones are faster. Returns the pipeline."""
        self.model.compile_for_sampling(mode=mode, dynamic=dynamic)
        return self

    @torch.no_grad()
    def __call__(self, class_labels=None, *, batch_size: int | None = None, sampling=None,
                 generator: torch.Generator | None = None, noise: list[torch.Tensor] | None = None,
                 output_type: str = "pil", autocast_dtype: torch.dtype | None = None, decode_batch: int = 32,
                 progress: bool = False, on_scale=None, **options):
        """Generate images for ``class_labels`` (a list, or None with ``batch_size`` when unconditional).

        sampling / options: the family's sampling options (``FlowARSampling`` / ``VARSampling``; None: the
        model's saved defaults) and overrides of its fields, e.g. ``guidance_scale=4, steps=10``. noise: the
        per-scale randomness (see the model's ``sample``). output_type: "pil" (list of PIL images), "pt"
        ((B, 3, H, W) float in [0, 1]), "np" ((B, H, W, 3) uint8), "latent" (FlowAR: the latents; VAR: the
        token maps), "sample" (the model's sample output, for ``flowar.outputs.decode_output`` later). autocast_dtype: e.g. torch.bfloat16 for the generator (never the decoder; FlowAR's ODE
        state stays float64). on_scale: called with (k, num_scales) after each scale (see
        ``flowar.sampling.run_scales``).
        """
        check_output_type(output_type)
        with autocast_context(self.device, autocast_dtype):
            sample = generate(self.model, class_labels, autoencoder=self.autoencoder, batch_size=batch_size,
                              sampling=sampling, generator=generator, noise=noise, progress=progress,
                              on_scale=on_scale, **options)
        return decode_output(self.autoencoder, sample, output_type, decode_batch=decode_batch)

    def inpaint(self, image, mask, class_label=None, *, generator=None, **kwargs):
        """Zero-shot in-/out-painting and class-conditional editing; see :func:`flowar.editing.inpaint`."""
        return inpaint(self, image, mask, class_label, generator=generator, **kwargs)

    def save_pretrained(self, path) -> None:
        """The model's files in ``path``, the autoencoder's folder in ``path/<autoencoder_folder>`` and the
        class names, where known, in ``path/class_names.json``."""
        self.model.save_pretrained(path)
        self.autoencoder.save_pretrained(Path(path) / self.autoencoder_folder)
        if self.class_names is not None:
            write_class_names(path, self.class_names)

    @classmethod
    def load_autoencoder(cls, source, *, model, map_location="cpu"):
        """The family's autoencoder from a folder or file ``source``, for ``model``."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path, *, autoencoder=None, map_location="cpu", **named):
        """Load ``path`` (model files, plus the ``autoencoder_folder`` beside them unless ``autoencoder`` is an
        autoencoder object, folder or file to use instead). The family's own name for it (FlowAR ``vae=``,
        VAR ``tokenizer=``) may be used instead of ``autoencoder=``."""
        unknown = sorted(set(named) - {cls.autoencoder_folder})
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword(s) {unknown}; the "
                            f"autoencoder is autoencoder= or {cls.autoencoder_folder}=")
        if named:
            if autoencoder is not None:
                raise ValueError(f"give autoencoder= or {cls.autoencoder_folder}=, not both")
            autoencoder = named[cls.autoencoder_folder]
        model = cls.model_class.from_pretrained(path, map_location=map_location)
        if autoencoder is None:
            autoencoder = Path(path) / cls.autoencoder_folder
            if not autoencoder.is_dir():
                raise FileNotFoundError(f"path {path} has no {cls.autoencoder_folder}/ folder; pass "
                                        f"{cls.autoencoder_folder}=... explicitly")
        pipeline = cls._assemble(model, autoencoder, map_location)
        pipeline.class_names = read_class_names(path, model.config.num_classes)
        return pipeline

    @classmethod
    def from_released(cls, path, preset, autoencoder, *, map_location="cpu"):
        """The authors' released checkpoint ``path`` in ``preset`` with ``autoencoder`` (object, folder or file)."""
        model = cls.model_class.from_released(path, preset, map_location=map_location)
        return cls._assemble(model, autoencoder, map_location)

    @classmethod
    def _assemble(cls, model, autoencoder, map_location):
        """The pipeline of ``model`` and ``autoencoder`` (an object, or a folder or file to load for the model)."""
        if isinstance(autoencoder, (str, Path)):
            autoencoder = cls.load_autoencoder(autoencoder, model=model, map_location=map_location)
        return cls(model, autoencoder.to(map_location))


class VAEPipeline(ScaleWisePipeline):
    """The pipeline of a family that samples continuous latents, which a VAE (saved in ``vae/``) decodes."""

    autoencoder_folder = VAE_FOLDER

    @property
    def vae(self):
        return self.autoencoder

    @classmethod
    def load_autoencoder(cls, source, *, model=None, map_location="cpu"):
        return load_vae(source, map_location=map_location)


class FlowARPipeline(VAEPipeline):
    """Class labels in, images out: FlowAR samples latents and the VAE decodes them."""

    model_class = FlowAR
