"""Any diffusers ``AutoencoderKL`` behind the ``LatentAutoencoder`` protocol, with its latent scaling.

The map from the autoencoder's raw latents to the generator's follows diffusers' config fields:
``scaled = (raw - shift_factor - latents_mean) * scaling_factor / latents_std``, where ``latents_mean`` and
``latents_std`` are per-channel (SDXL-style VAEs such as Playground v2.5's carry them; 0 and 1 where absent)
and ``shift_factor`` is one number (SD3 / Flux).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

# "owner/name" with the characters the hub allows; anything else that does not exist on disk is
# treated as a mistyped local path, so the user gets a FileNotFoundError instead of a network error.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _resolve_source(path_or_hub_id: str | os.PathLike, subfolder: str | None) -> str:
    """Return a local folder as a string, or a hub id unchanged; raise for local paths that are missing."""
    text = os.fspath(path_or_hub_id)
    local = Path(text).expanduser()
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"path_or_hub_id {text!r} (subfolder={subfolder!r}) has no config.json at {folder}; "
                "expected a folder written by save_pretrained"
            )
        # Only safetensors weights: diffusers would otherwise fall back to unpickling a .bin file.
        if not (folder / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(
                f"path_or_hub_id {text!r} (subfolder={subfolder!r}) has no diffusion_pytorch_model.safetensors "
                f"at {folder}; expected a diffusers AutoencoderKL folder"
            )
        return str(local)
    if _HUB_ID.match(text):
        return text
    raise FileNotFoundError(
        f"path_or_hub_id {text!r} is neither an existing local folder nor a hub id of the form 'owner/name'"
    )


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` that encodes to scaled latents and decodes them back."""

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = True,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        config = autoencoder.config
        if scaling_factor is None:
            scaling_factor = config.get("scaling_factor", None)
            scaling_factor = 1.0 if scaling_factor is None else scaling_factor
        if shift_factor is None:
            shift_factor = config.get("shift_factor", None)
        self.set_scaling(scaling_factor, 0.0 if shift_factor is None else shift_factor,
                         latents_mean=config.get("latents_mean", None), latents_std=config.get("latents_std", None))
        # FlowAR trains on posterior samples (the latent noise acts as augmentation); the mean is the
        # deterministic choice for reconstructions and for caching latents.
        self.sample_posterior = sample_posterior

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = True,
        torch_dtype: torch.dtype | None = None,
        **kw,
    ) -> "DiffusersVAE":
        """Load a diffusers folder (local, or a hub id where a network exists); ``kw`` goes to diffusers."""
        source = _resolve_source(path_or_hub_id, subfolder)
        if subfolder is not None:
            kw["subfolder"] = subfolder
        if torch_dtype is not None:
            kw["torch_dtype"] = torch_dtype
        # Without accelerate diffusers falls back to a plain load anyway, but warns on every call.
        kw.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
        kw.setdefault("use_safetensors", True)  # never unpickle a .bin file
        autoencoder = AutoencoderKL.from_pretrained(source, **kw)
        return cls(
            autoencoder, scaling_factor=scaling_factor, shift_factor=shift_factor, sample_posterior=sample_posterior
        )

    def save_pretrained(self, path: str | os.PathLike, **kw) -> None:
        """Write a diffusers folder whose config carries this wrapper's current scaling, shift and channel stats."""
        # None for a zero shift (and for absent channel stats) keeps the config in the form most diffusers
        # checkpoints use.
        self.autoencoder.register_to_config(
            scaling_factor=self._scaling_factor, shift_factor=self._shift_factor or None,
            latents_mean=None if self._latents_mean is None else list(self._latents_mean),
            latents_std=None if self._latents_std is None else list(self._latents_std),
        )
        self.autoencoder.save_pretrained(os.fspath(path), **kw)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        # Every encoder level but the last halves the resolution.
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return self._scaling_factor

    @property
    def shift_factor(self) -> float:
        return self._shift_factor

    @property
    def latents_mean(self) -> tuple[float, ...] | None:
        """Per-channel mean subtracted from the raw latent, or None."""
        return self._latents_mean

    @property
    def latents_std(self) -> tuple[float, ...] | None:
        """Per-channel std the raw latent is divided by, or None."""
        return self._latents_std

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def set_scaling(self, scaling_factor: float, shift_factor: float = 0.0, *,
                    latents_mean=None, latents_std=None) -> None:
        """Set the map ``scaled = (raw - shift_factor - latents_mean) * scaling_factor / latents_std`` used by
        encode and decode; ``latents_mean`` / ``latents_std`` are one number per latent channel, or None (0 / 1)."""
        scaling_factor, shift_factor = float(scaling_factor), float(shift_factor)
        if not scaling_factor > 0 or scaling_factor == float("inf"):
            raise ValueError(f"scaling_factor must be a positive finite number, got {scaling_factor}")
        if shift_factor != shift_factor or abs(shift_factor) == float("inf"):
            raise ValueError(f"shift_factor must be a finite number, got {shift_factor}")
        latents_mean = self._channel_stats("latents_mean", latents_mean, positive=False)
        latents_std = self._channel_stats("latents_std", latents_std, positive=True)
        self._latents_mean, self._latents_std = latents_mean, latents_std
        self._scaling_factor = scaling_factor
        self._shift_factor = shift_factor

    def _channel_stats(self, name: str, values, *, positive: bool) -> tuple[float, ...] | None:
        if values is None:
            return None
        values = tuple(float(v) for v in (values.tolist() if torch.is_tensor(values) else values))
        allowed = "positive finite numbers" if positive else "finite numbers"
        if len(values) != self.latent_channels or not all(
                v == v and abs(v) != float("inf") and (v > 0 or not positive) for v in values):
            raise ValueError(f"{name} must be {self.latent_channels} {allowed} (one per latent channel) or None, "
                             f"got {list(values)}")
        return values

    def _channel_view(self, values: tuple[float, ...] | None, default: float, like: torch.Tensor):
        """Per-channel values shaped (1, C, 1, 1) like ``like``, or the plain ``default`` where there are none."""
        if values is None:
            return default
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def _to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        mean = self._channel_view(self._latents_mean, 0.0, raw)
        std = self._channel_view(self._latents_std, 1.0, raw)
        return (raw - self._shift_factor - mean) * (self._scaling_factor / std)

    def _to_raw(self, scaled: torch.Tensor) -> torch.Tensor:
        mean = self._channel_view(self._latents_mean, 0.0, scaled)
        std = self._channel_view(self._latents_std, 1.0, scaled)
        return scaled * (std / self._scaling_factor) + mean + self._shift_factor

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images must be (B, 3, H, W) with H and W divisible by {f}, got {tuple(images.shape)}"
            )

    def _raw_latents(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Unscaled posterior sample (or mean) of (B, 3, H, W) images -> (B, C, H/f, W/f)."""
        self._check_images(images)
        posterior = self.autoencoder.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist
        return posterior.sample(generator=generator) if self.sample_posterior else posterior.mean

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> the posterior's (mean, std) in scaled latent space.

        ``mean + std * eps`` is then exactly a posterior sample that ``encode`` could return; caching
        these two lets training draw fresh samples without running the encoder again.
        """
        self._check_images(images)
        posterior = self.autoencoder.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist
        std = self._channel_view(self._latents_std, 1.0, posterior.std)
        return self._to_scaled(posterior.mean), posterior.std * (self._scaling_factor / std)

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, C, H/f, W/f) scaled latents."""
        return self._to_scaled(self._raw_latents(images, generator))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, h*f, w*f) images, about [-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        raw = self._to_raw(latents.to(device=self.device, dtype=self.dtype))
        return self.autoencoder.decode(raw).sample

    @torch.no_grad()
    def estimate_scaling(
        self, images: torch.Tensor, *, shift: bool = False, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """(scaling_factor, shift_factor) that give this batch's latents unit std (and zero mean if ``shift``).

        The latents are what ``encode`` would draw (posterior samples unless ``sample_posterior`` is
        off), pooled over all elements as in LDM. Nothing is changed; pass the result to ``set_scaling``.
        """
        raw = self._raw_latents(images, generator).double()
        if raw.numel() < 2:
            raise ValueError(f"images must give at least 2 latent values to estimate a std, got {raw.numel()}")
        scaling_factor = 1.0 / raw.std().item()
        shift_factor = raw.mean().item() if shift else 0.0
        return scaling_factor, shift_factor

    @torch.no_grad()
    def estimate_channel_stats(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(latents_mean, latents_std) of this batch's raw latents, per channel: with them (and scaling_factor 1,
        shift 0) every channel of the scaled latents has zero mean and unit std. A VAE's channels can differ
        several-fold in scale and carry offsets that one global factor keeps, so the generator's unit noise would
        swamp some channels and barely reach others. Nothing is changed; pass the result to ``set_scaling``."""
        raw = self._raw_latents(images, generator).double()
        if raw.shape[0] * raw.shape[2] * raw.shape[3] < 2:
            raise ValueError("images must give at least 2 latent values per channel to estimate a std")
        mean = raw.mean(dim=(0, 2, 3))
        std = raw.std(dim=(0, 2, 3))
        return tuple(mean.tolist()), tuple(std.clamp_min(1e-12).tolist())
