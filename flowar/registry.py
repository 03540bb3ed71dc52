"""``model_type`` -> class: which model and pipeline read a saved folder (its config.json says)."""

from __future__ import annotations

from vae.files import read_model_type
from vae.msvq import MultiScaleVQVAE

from .model import FlowAR
from .pipeline import FlowARPipeline
from .var import VAR
from .var_pipeline import VARPipeline

MODEL_CLASSES = {cls.model_type: cls for cls in (FlowAR, VAR, MultiScaleVQVAE)}
PIPELINE_CLASSES = {cls.model_class.model_type: cls for cls in (FlowARPipeline, VARPipeline)}


def model_type(path) -> str:
    """The ``model_type`` in the folder's config.json."""
    return read_model_type(path)


def pipeline_class(kind: str) -> type:
    """The pipeline class of a model type; a ValueError names the types that have one."""
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"a {kind!r} model has no pipeline; pipelines exist for {sorted(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[kind]


def load_model(path, *, map_location="cpu"):
    """The model (FlowAR, VAR or a VQ tokenizer) saved in folder ``path``."""
    kind = model_type(path)
    if kind not in MODEL_CLASSES:
        raise ValueError(f"path {path} holds a {kind!r} model; known types are {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind].from_pretrained(path, map_location=map_location)


def load_pipeline(path, *, autoencoder=None, map_location="cpu"):
    """The FlowARPipeline or VARPipeline saved in folder ``path``, as its config.json's ``model_type`` says.

    autoencoder: a VAE (FlowAR) or tokenizer (VAR) object, folder or file that replaces the folder's own.
    """
    try:
        cls = pipeline_class(model_type(path))
    except ValueError as err:
        raise ValueError(f"path {path}: {err}") from None
    return cls.from_pretrained(path, autoencoder=autoencoder, map_location=map_location)
