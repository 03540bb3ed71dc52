"""``model_type`` -> class: which model and pipeline read a saved folder (its config.json says)."""

from __future__ import annotations

from pathlib import Path

from vae.files import read_model_type, read_torch_state_dict
from vae.flexvq import FlexVQVAE
from vae.msvq import MultiScaleVQVAE

from .flexvar import FlexVAR
from .flexvar_pipeline import FlexVARPipeline, load_flexvq_tokenizer
from .model import FlowAR
from .pipeline import FlowARPipeline
from .var import VAR
from .var_pipeline import VARPipeline
from .var_pipeline import load_tokenizer as load_var_tokenizer
from .xar import XAR
from .xar_pipeline import XARPipeline

MODEL_CLASSES = {cls.model_type: cls for cls in (FlowAR, VAR, FlexVAR, XAR, MultiScaleVQVAE, FlexVQVAE)}
PIPELINE_CLASSES = {cls.model_class.model_type: cls for cls in (FlowARPipeline, VARPipeline, FlexVARPipeline,
                                                                XARPipeline)}
TOKENIZER_CLASSES = {cls.model_type: cls for cls in (MultiScaleVQVAE, FlexVQVAE)}


def model_type(path) -> str:
    """The ``model_type`` in the folder's config.json."""
    return read_model_type(path)


def pipeline_class(kind: str) -> type:
    """The pipeline class of a model type; a ValueError names the types that have one."""
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"a {kind!r} model has no pipeline; pipelines exist for {sorted(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[kind]


def load_model(path, *, map_location="cpu"):
    """The model (FlowAR, VAR, FlexVAR, xAR or a VQ tokenizer) saved in folder ``path``."""
    kind = model_type(path)
    if kind not in MODEL_CLASSES:
        raise ValueError(f"path {path} holds a {kind!r} model; known types are {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind].from_pretrained(path, map_location=map_location)


def load_pipeline(path, *, autoencoder=None, map_location="cpu"):
    """The FlowARPipeline, VARPipeline, FlexVARPipeline or XARPipeline saved in folder ``path``, as its config.json's
    ``model_type`` says.

    autoencoder: a VAE (FlowAR) or tokenizer (VAR) object, folder or file that replaces the folder's own.
    """
    try:
        cls = pipeline_class(model_type(path))
    except ValueError as err:
        raise ValueError(f"path {path}: {err}") from None
    return cls.from_pretrained(path, autoencoder=autoencoder, map_location=map_location)


def load_tokenizer(path, *, map_location="cpu"):
    """A VQ tokenizer: our folder (VAR's multi-scale one or FlexVAR's, as its config.json says), or a released
    file, told apart by its keys: FlexVAR's ``FlexVAE.pth`` (LlamaGen's ``encoder.conv_blocks``) or VAR's
    ``vae_ch160v4096z32.pth``."""
    source = Path(path)
    if source.is_file():
        keys = read_torch_state_dict(source, map_location=map_location, wrappers=("model",)).keys()
        if any(key.startswith("encoder.conv_blocks.") for key in keys):
            return load_flexvq_tokenizer(source, map_location=map_location)
        return load_var_tokenizer(source, map_location=map_location)
    kind = model_type(source)
    if kind not in TOKENIZER_CLASSES:
        raise ValueError(f"path {path} holds a {kind!r} model, not a tokenizer ({sorted(TOKENIZER_CLASSES)})")
    return TOKENIZER_CLASSES[kind].from_pretrained(source, map_location=map_location)
