"""VAR + its multi-scale VQ tokenizer -> images: the VAR pipeline, with FlowARPipeline's contract."""

from __future__ import annotations

from pathlib import Path

from vae.msvq import MultiScaleVQVAE, get_msvq_preset

from .pipeline import ScaleWisePipeline
from .var import VAR

TOKENIZER_FOLDER = "tokenizer"
RELEASED_TOKENIZER = "vae_ch160v4096z32"  # the architecture of VAR's released tokenizer file


def load_tokenizer(source, *, scales=None, preset: str = RELEASED_TOKENIZER, map_location="cpu") -> MultiScaleVQVAE:
    """A tokenizer from our folder (config.json + model.safetensors) or from a ``.pth`` with the authors' key
    names in the architecture ``preset`` (VAR's released ``vae_ch160v4096z32.pth`` by default), then with
    ``scales``, e.g. the model's, for the 512 px models."""
    path = Path(source)
    if path.is_file():
        overrides = {} if scales is None else {"scales": tuple(scales)}
        return MultiScaleVQVAE.from_released(path, get_msvq_preset(preset, **overrides), map_location=map_location)
    return MultiScaleVQVAE.from_pretrained(path, map_location=map_location)


class VARPipeline(ScaleWisePipeline):
    """Class labels in, images out: VAR samples token maps and the tokenizer decodes their f_hat."""

    model_class = VAR
    autoencoder_folder = TOKENIZER_FOLDER

    def __init__(self, model: VAR, tokenizer):
        model.check_tokenizer(tokenizer)  # scales, codebook size and code dimension must match
        super().__init__(model, tokenizer)

    @property
    def tokenizer(self):
        return self.autoencoder

    @classmethod
    def load_autoencoder(cls, source, *, model, map_location="cpu"):
        return load_tokenizer(source, scales=model.config.scales, map_location=map_location)
