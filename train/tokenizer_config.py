"""Tokenizer-training configuration: a dataclass read like ``TrainConfig`` (YAML, then ``key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from vae.msvq import MSVQ_PRESETS, RECON_LOSSES, MultiScaleVQConfig, get_msvq_preset

from .config import load_dataclass


@dataclass
class TokenizerConfig:
    """Everything a tokenizer-training run needs; written to ``out_dir/train_config.json``."""

    # data: "mnist" (bundled) or an image folder; evaluation on eval_data ("" = MNIST's 500 held-out digits, or for
    # a folder center crops of its first images, then not held out)
    data: str = "mnist"
    image_size: int = 0  # 0 = the preset's (scales[-1] x downsample); otherwise checked against it
    eval_data: str = ""
    eval_images: int = 500
    num_workers: int = 0  # DataLoader workers for an image folder
    # model: a vae.msvq preset plus field overrides, e.g. {"codebook_size": 128, "scales": [1, 2, 4, 8]}
    preset: str = "mnist"
    model: dict = field(default_factory=dict)
    # optimisation: AdamW with warmup + cosine; decay on conv weights only (see train_tokenizer._param_groups)
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm of the tokenizer; 0 = no clipping
    codebook_lr_scale: float = 1.0  # the codebook's learning rate relative to lr
    # losses: reconstruction "l2" or "l1" (+ the preset's beta-weighted commitment and the codebook loss)
    recon: str = "l2"
    # dead codes (train.dead_codes): re-initialise codes no scale picked for dead_after steps (0 = never), and move
    # codes to a scale with fewer than min_scale_use of its reachable codes live (0 = no floor)
    dead_after: int = 50
    min_scale_use: float = 0.9
    # optional patch-GAN hinge loss (train.gan): off while gan_weight is 0; on from step gan_start
    gan_weight: float = 0.0
    gan_start: int = 0
    gan_lr: float = 0.0  # the discriminator's learning rate; 0 = lr
    # VQGAN's discriminator betas: a low beta1 so that D follows the moving generator
    gan_betas: tuple[float, float] = (0.5, 0.9)
    # output and monitoring
    out_dir: str = "runs/tokenizer"
    eval_every: int = 0  # evaluate every N steps as well as at the end (0 = only at the end)
    tensorboard: bool = False  # log to out_dir/tensorboard
    progress: bool = True
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    threads: int = 0  # torch CPU threads (0 = torch's default; on a busy shared machine 1 is often faster)
    seed: int = 0

    def __post_init__(self):
        ints = {"image_size": 0, "eval_images": 1, "num_workers": 0, "steps": 1, "batch_size": 1, "warmup": 0,
                "dead_after": 0, "gan_start": 0, "eval_every": 0, "threads": 0, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"recon must be one of {RECON_LOSSES}, got {self.recon!r}")
        if self.preset not in MSVQ_PRESETS:
            raise ValueError(f"preset must be one of {sorted(MSVQ_PRESETS)}, got {self.preset!r}")
        checks = {"lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
                  "codebook_lr_scale": self.codebook_lr_scale > 0, "min_scale_use": 0.0 <= self.min_scale_use <= 1.0,
                  "gan_weight": self.gan_weight >= 0, "gan_lr": self.gan_lr >= 0,
                  "betas": _valid_betas(self.betas), "gan_betas": _valid_betas(self.gan_betas)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid config values: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
                             + " (lr, codebook_lr_scale > 0; weight_decay, grad_clip, gan_weight, gan_lr >= 0; "
                             "min_scale_use in [0, 1]; betas, gan_betas two numbers in [0, 1))")
        self.betas, self.gan_betas = tuple(self.betas), tuple(self.gan_betas)
        # Check the tokenizer's config now, not after the data has loaded.
        config = self.msvq_config()
        side = config.scales[-1] * config.downsample
        if self.image_size and self.image_size != side:
            raise ValueError(f"image_size {self.image_size} does not match the preset: scales {config.scales} x "
                             f"downsample {config.downsample} = {side} (image_size=0 takes it from the preset)")

    def msvq_config(self) -> MultiScaleVQConfig:
        """The tokenizer's config: the preset with the ``model`` overrides."""
        fields = {f.name for f in dataclasses.fields(MultiScaleVQConfig)}
        unknown = sorted(set(self.model) - fields)
        if unknown:
            raise ValueError(f"unknown model keys {['model.' + k for k in unknown]}; "
                             f"MultiScaleVQConfig fields are {sorted(fields)}")
        return get_msvq_preset(self.preset, **self.model)

    @property
    def discriminator_lr(self) -> float:
        return self.gan_lr if self.gan_lr > 0 else self.lr

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"], out["gan_betas"] = list(self.betas), list(self.gan_betas)
        return out


def _valid_betas(betas) -> bool:
    try:
        return len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)
    except (TypeError, ValueError):
        return False


def load_tokenizer_config(path: str | None = None, overrides: Sequence[str] = ()) -> TokenizerConfig:
    """A TokenizerConfig from an optional YAML file and ``key=value`` overrides (``model.KEY=VALUE`` for the
    tokenizer's fields), loaded by the same helper as ``train.config.load_config``."""
    return load_dataclass(TokenizerConfig, path, overrides)
