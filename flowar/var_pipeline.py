"""VAR + its multi-scale VQ tokenizer -> images: the VAR pipeline, with FlowARPipeline's contract."""

from __future__ import annotations

from pathlib import Path

import torch

from vae.msvq import MultiScaleVQVAE, get_msvq_preset

from .pipeline import ScaleWisePipeline
from .var import VAR

TOKENIZER_FOLDER = "tokenizer"
RELEASED_TOKENIZER = "vae_ch160v4096z32"  # the architecture of VAR's released tokenizer file


def load_tokenizer(source, *, scales=None, map_location="cpu") -> MultiScaleVQVAE:
    """A tokenizer from our folder (config.json + model.safetensors) or from VAR's released
    ``vae_ch160v4096z32.pth`` (then with ``scales``, e.g. the model's, for the 512 px models)."""
    path = Path(source)
    if path.is_file():
        overrides = {} if scales is None else {"scales": tuple(scales)}
        return MultiScaleVQVAE.from_released(path, get_msvq_preset(RELEASED_TOKENIZER, **overrides),
                                             map_location=map_location)
    return MultiScaleVQVAE.from_pretrained(path, map_location=map_location)


class VARPipeline(ScaleWisePipeline):
    """Class labels in, images out: VAR samples token maps and the tokenizer decodes their f_hat."""

    autoencoder_folder = TOKENIZER_FOLDER

    def __init__(self, model: VAR, tokenizer):
        model.check_tokenizer(tokenizer)  # scales, codebook size and code dimension must match
        super().__init__(model, tokenizer)

    @property
    def tokenizer(self):
        return self.autoencoder

    @classmethod
    def from_pretrained(cls, path, *, tokenizer=None, map_location="cpu") -> "VARPipeline":
        """Load ``path`` (model files plus a ``tokenizer/`` folder), or the model with ``tokenizer``: a
        tokenizer object, our tokenizer folder, or VAR's released ``vae_ch160v4096z32.pth``."""
        model = VAR.from_pretrained(path, map_location=map_location)
        tokenizer = cls._autoencoder_source(path, tokenizer, "tokenizer")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer, scales=model.config.scales, map_location=map_location)
        return cls(model, tokenizer.to(map_location))

    @classmethod
    def from_released(cls, path, preset, tokenizer, *, map_location="cpu") -> "VARPipeline":
        """VAR's released ``var_d{16,20,24,30}.pth`` in ``preset`` with ``tokenizer`` (object, folder or
        ``vae_ch160v4096z32.pth``)."""
        model = VAR.from_released(path, preset, map_location=map_location)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer, scales=model.config.scales, map_location=map_location)
        return cls(model, tokenizer.to(map_location))

    def __call__(self, class_labels=None, *, batch_size=None, output_type: str = "pil",
                 autocast_dtype: torch.dtype | None = None, decode_batch: int = 32, **sample_kwargs):
        """Generate images for ``class_labels`` (a list, or None with ``batch_size`` when unconditional).

        sample_kwargs go to :meth:`VAR.sample` (cfg in VAR's convention, 0 = unguided; top_k, top_p,
        temperature, generator, more_smooth, progress). output_type: "pil" (list of PIL images), "pt"
        ((B, 3, H, W) float in [0, 1]), "np" ((B, H, W, 3) uint8), "latent" (the K token maps (B, s, s)).
        autocast_dtype: e.g. torch.bfloat16 to run the transformer under autocast.
        """
        return self._generate(class_labels, batch_size, output_type, autocast_dtype, decode_batch, sample_kwargs)

    def _sample(self, class_labels, batch_size, sample_kwargs):
        out = self.model.sample(class_labels, tokenizer=self.tokenizer, batch_size=batch_size, **sample_kwargs)
        return out.f_hat, out.indices
