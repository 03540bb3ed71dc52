"""The file-format layer of the project, in the spirit of diffusers' ConfigMixin / ModelMixin.

One place for everything that touches a weights file or a config file: atomic writes, the config
(de)serialiser, the strict state-dict loader, the ``weights_only`` reader of ``.pth`` files, the safetensors
reader, and the ``save_pretrained`` / ``from_pretrained`` folder format (``config.json`` + ``model.safetensors``)
shared by FlowAR, VAR and the VQ tokenizer. vae/ is the lowest package that writes files, so it lives here.

A release folder's ``config.json`` holds ``"model_type"`` (which class reads it; see ``flowar.registry``) and
the fields of the model's config dataclass, nested dataclasses (such as sampling defaults) as objects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import types
import typing
import zipfile
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_LISTED = 30  # keys shown per category in a mismatch report


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file in the same folder, flush it to disk, then rename it to
    ``path``: a crash or a full disk leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- configs
class ConfigMixin:
    """For config dataclasses: to and from the plain dict of ``config.json``.

    Tuples are stored as lists and nested config dataclasses as dicts; ``from_dict`` turns them back by the
    field annotations and rejects fields the dataclass does not have.
    """

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, exactly as config.json holds it

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} must be read from a dict, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "model_type"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known fields are {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _from_json(hints[k], v) for k, v in data.items()})


def _from_json(hint, value):
    """A JSON value back in the type of its annotation: lists as tuples, dicts as nested config dataclasses."""
    if isinstance(hint, type) and issubclass(hint, ConfigMixin) and isinstance(value, dict):
        return hint.from_dict(value)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is not type(None):
                converted = _from_json(option, value)
                if converted is not value:
                    return converted
    return value


def read_config(folder) -> dict:
    """The dict in ``folder/config.json``; a missing file or broken JSON is an error naming the file."""
    file = Path(folder) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path {folder} has no {CONFIG_NAME}")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_model_type(folder) -> str:
    """The ``model_type`` in ``folder/config.json``."""
    kind = read_config(folder).get("model_type")
    if kind is None:
        raise ValueError(f"{Path(folder) / CONFIG_NAME} has no model_type")
    return kind


# ---------------------------------------------------------------------------------------------- class names
CLASS_NAMES_NAME = "class_names.json"


def write_class_names(folder, names) -> None:
    """``folder/class_names.json``: a JSON list, the name of class id i at index i (the training data's
    folder names, or the digits), so applications can show names instead of ids."""
    names = [str(n) for n in names]
    atomic_write(Path(folder) / CLASS_NAMES_NAME, lambda tmp: tmp.write_text(json.dumps(names, indent=1)))


def read_class_names(folder, num_classes: int) -> list[str] | None:
    """The class names saved in ``folder`` (None when it has none); a file that is not a list of
    ``num_classes`` strings is an error naming it."""
    file = Path(folder) / CLASS_NAMES_NAME
    if not file.is_file():
        return None
    try:
        names = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != num_classes:
        raise ValueError(f"{file} must hold a list of {num_classes} strings (one per class id)")
    return names


# ---------------------------------------------------------------------------------------------- weights
def read_safetensors(path, *, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"path does not exist or is not a file: {file}")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"path {file} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_torch_state_dict(path, *, map_location="cpu", wrappers=("model_ema", "model", "state_dict")) -> dict:
    """A state dict of tensors from a ``.pth`` file, read with ``weights_only=True``: no pickled code runs.

    Accepts a bare state dict or one wrapped under one of ``wrappers`` (the first present wins; a tuple of keys
    is a nested path, e.g. ``("trainer", "var_wo_ddp")``). A truncated or corrupt file, or one holding Python
    objects, is a ValueError naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"path does not exist or is not a file: {file}")
    try:
        obj = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # torch names the class it refused to build
            raise ValueError(f"path {file} holds Python objects besides tensors and plain containers, which we "
                             "do not unpickle") from err
        raise ValueError(f"path {file} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            UnicodeDecodeError) as err:
        raise ValueError(f"path {file} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from None
    for wrapper in wrappers:
        inner = obj
        for key in (wrapper if isinstance(wrapper, tuple) else (wrapper,)):
            inner = inner.get(key) if isinstance(inner, dict) else None
        if isinstance(inner, dict):
            obj = inner
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"path {file} does not hold a state dict of tensors")
    return obj


def load_state_strict(model: torch.nn.Module, state: dict, *, source: str) -> None:
    """Load ``state`` into ``model``; on any missing, unexpected or mis-shaped key, raise listing them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
        if keys:
            shown = ", ".join(keys[:_LISTED]) + (f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else "")
            parts.append(f"{len(keys)} {name}: {shown}")
    if parts:
        raise ValueError(f"{source} does not match the {type(model).__name__} architecture; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- folders
class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from one config dataclass.

    The class sets ``model_type`` (written to config.json, checked on load) and ``config_class``.
    """

    model_type: str
    config_class: type

    def save_pretrained(self, path) -> Path:
        """Write ``config.json`` (``model_type`` + the config's fields) and ``model.safetensors`` into the
        folder ``path`` (created if needed), each atomically."""
        from safetensors.torch import save_file

        folder = Path(path).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {"model_type": self.model_type, **self.config.to_dict()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        return folder

    @classmethod
    def from_pretrained(cls, path, *, map_location="cpu"):
        """Build the model from a folder written by :meth:`save_pretrained` and load its weights strictly
        (eval mode)."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"path must be a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}: {folder}")
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"path {folder} has no {WEIGHTS_NAME}")
        data = read_config(folder)
        kind = data.get("model_type")
        if kind != cls.model_type:
            raise ValueError(f"path {folder} holds a {kind!r} model, not {cls.model_type!r}")
        model = cls(cls.config_class.from_dict(data))
        load_state_strict(model, read_safetensors(folder / WEIGHTS_NAME, device=map_location),
                          source=str(folder / WEIGHTS_NAME))
        return model.eval()
