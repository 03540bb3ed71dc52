"""xAR + VAE -> images: the xAR pipeline, with FlowARPipeline's contract (the VAE saved in ``vae/``)."""

from __future__ import annotations

from .pipeline import VAEPipeline
from .xar import XAR


class XARPipeline(VAEPipeline):
    """Class labels in, images out: xAR samples latents cell by cell and the VAE decodes them."""

    model_class = XAR
