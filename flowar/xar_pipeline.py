"""xAR + VAE -> images: the xAR pipeline, with FlowARPipeline's contract (the VAE saved in ``vae/``)."""

from __future__ import annotations

from .pipeline import VAE_FOLDER, ScaleWisePipeline, load_vae
from .xar import XAR


class XARPipeline(ScaleWisePipeline):
    """Class labels in, images out: xAR samples latents cell by cell and the VAE decodes them."""

    model_class = XAR
    autoencoder_folder = VAE_FOLDER

    @property
    def vae(self):
        return self.autoencoder

    @classmethod
    def load_autoencoder(cls, source, *, model=None, map_location="cpu"):
        return load_vae(source, map_location=map_location)
