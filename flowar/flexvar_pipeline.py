"""FlexVAR + its VQ tokenizer -> images: the FlexVAR pipeline, with FlowARPipeline's contract."""

from __future__ import annotations

from pathlib import Path

from vae.flexvq import FlexVQVAE

from .flexvar import FlexVAR
from .pipeline import ScaleWisePipeline

TOKENIZER_FOLDER = "tokenizer"


def load_flexvq_tokenizer(source, *, preset: str = "flexvae", map_location="cpu") -> FlexVQVAE:
    """A FlexVQ tokenizer from our folder (config.json + model.safetensors) or from the authors' ``FlexVAE.pth``
    (in the architecture ``preset``)."""
    path = Path(source)
    if path.is_file():
        return FlexVQVAE.from_released(path, preset, map_location=map_location)
    return FlexVQVAE.from_pretrained(path, map_location=map_location)


class FlexVARPipeline(ScaleWisePipeline):
    """Class labels in, images out: FlexVAR samples token maps over any list of sides and the tokenizer decodes
    the last one (a larger last side gives larger images)."""

    model_class = FlexVAR
    autoencoder_folder = TOKENIZER_FOLDER

    def __init__(self, model: FlexVAR, tokenizer, **kwargs):
        model.check_tokenizer(tokenizer)  # codebook size and code dimension must match
        super().__init__(model, tokenizer, **kwargs)

    @property
    def tokenizer(self):
        return self.autoencoder

    @classmethod
    def load_autoencoder(cls, source, *, model=None, map_location="cpu"):
        return load_flexvq_tokenizer(source, map_location=map_location)
