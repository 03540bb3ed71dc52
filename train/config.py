"""Training configuration: a dataclass read from YAML, then ``key=value`` overrides, type-checked."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    """Everything a training run needs; saved beside its checkpoints and compared on resume."""

    # data: "mnist" (bundled), an image folder, or a latent cache folder written by train.cache_latents
    data: str = "mnist"
    image_size: int = 32
    latent_cache: str = ""  # when set, train on cached VAE posteriors instead of encoding online
    vae: str = ""  # FlowAR: diffusers folder / hub id / MAR kl16.ckpt; needed unless latent_cache is set
    tokenizer: str = ""  # VAR / FlexVAR: a tokenizer folder, vae_ch160v4096z32.pth / FlexVAE.pth; recorded in a cache
    num_workers: int = 0
    # model: a FlowAR (flowar-*), VAR (var-*), FlexVAR (flexvar-*) or xAR (xar-*) preset, plus field overrides,
    # e.g. {"num_classes": 10, "scales": [1, 2, 4, 8]}
    preset: str = "flowar-tiny"
    model: dict = field(default_factory=dict)
    # optimisation (FlowAR's recipe scaled down: AdamW (0.9, 0.95), wd 0.02, warmup + cosine, clip 3)
    global_batch: int = 64
    grad_accum: int = 1
    lr: float = 0.0  # absolute learning rate; 0 means blr * global_batch / 256
    blr: float = 5e-5
    min_lr: float = 1e-5
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    total_steps: int = 1000
    grad_clip: float = 3.0
    ema: float = 0.9999  # the EMA's decay; 0 keeps no average (the EMA, and so the export, is the trained weights)
    # True: the EMA averages only trained weights (train.train.ema_decay); False: it starts at the random init,
    # as in the authors' code, which for runs shorter than a few 1 / (1 - ema) steps keeps part of that init.
    ema_bias_correction: bool = True
    bf16: bool = False
    # torch.compile the model's forward (the loss) in place; checkpoints are unchanged. The first steps compile.
    compile: bool = False
    seed: int = 0
    # output and monitoring
    out_dir: str = "runs/flowar"
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 200
    progress: bool = True
    # in-training FID (eval.fid, default Inception network): every fid_every steps (0 = never), rank 0
    # draws fid_samples EMA samples from fixed seeds and logs eval/fid against fid_reference (an image
    # folder, an images npz or a mu/sigma npz; "" = the training data when it is "mnist" or a folder)
    fid_every: int = 0
    fid_samples: int = 1000
    fid_reference: str = ""

    def __post_init__(self):
        checks = {
            "global_batch": self.global_batch >= 1, "grad_accum": self.grad_accum >= 1,
            "total_steps": self.total_steps >= 1, "warmup_steps": self.warmup_steps >= 0,
            "checkpoint_every": self.checkpoint_every >= 1, "log_every": self.log_every >= 1,
            "sample_every": self.sample_every >= 0, "ema": 0.0 <= self.ema < 1.0,
            "grad_clip": self.grad_clip >= 0, "image_size": self.image_size >= 1,
            "fid_every": self.fid_every >= 0, "fid_samples": self.fid_samples >= 2,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid config values: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.global_batch % self.grad_accum:
            raise ValueError(f"global_batch ({self.global_batch}) must be divisible by grad_accum ({self.grad_accum})")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr > 0 else self.blr * self.global_batch / 256

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def _convert(hint, value):
    """``value`` as type ``hint``; raises TypeError/ValueError when it is not one."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        if hint in (int, float) and isinstance(value, bool):
            raise TypeError
        return hint(value)
    if origin is tuple:
        if isinstance(value, str):  # ``betas=0.5,0.9`` on a command line is the string "0.5,0.9" to YAML
            value = [item for item in value.strip("()[] ").split(",") if item.strip()]
            value = [yaml.safe_load(item) for item in value]
        items = list(value)
        item_types = typing.get_args(hint)
        if len(items) != len(item_types):
            raise TypeError
        return tuple(_convert(t, v) for t, v in zip(item_types, items))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return dict(value)
    return value


def _coerce(cls: type, name: str, value):
    """Check/convert ``value`` to the annotated type of field ``name`` of dataclass ``cls``; raise naming the key."""
    hint = typing.get_type_hints(cls)[name]
    try:
        return _convert(hint, value)
    except (TypeError, ValueError):
        pass
    kind = hint.__name__ if isinstance(hint, type) else str(hint)
    raise ValueError(f"config key {name!r} must be of type {kind}, got {value!r}")


ConfigT = typing.TypeVar("ConfigT")


def load_dataclass(cls: type[ConfigT], path: str | None = None, overrides: typing.Sequence[str] = ()) -> ConfigT:
    """An instance of the config dataclass ``cls`` from an optional YAML (or JSON) file, then ``key=value``
    overrides (values parsed as YAML), every value checked against its field's type.

    Dotted keys reach into a dict field: ``model.num_classes=10``.
    """
    data: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file does not exist: {file}")
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {file} must hold a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    dict_fields = {f.name for f in dataclasses.fields(cls)
                   if hints[f.name] is dict or typing.get_origin(hints[f.name]) is dict}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        head, dot, rest = key.partition(".")
        if dot and head in dict_fields:
            if not isinstance(data.get(head, {}), dict):
                raise ValueError(f"config key {head!r} must be a mapping to take {key}=..., got {data[head]!r}")
            data.setdefault(head, {})[rest] = value
        else:
            data[key] = value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
    return cls(**{k: _coerce(cls, k, v) for k, v in data.items()})


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from an optional YAML file and ``key=value`` overrides (see ``load_dataclass``)."""
    return load_dataclass(TrainConfig, path, overrides)
