"""The interface every scale-wise model family (FlowAR, VAR) implements, and what they share.

The rest of the library (the sampling engine, pipelines, editing, collaborative decoding, training and
evaluation) talks to a model through this interface instead of asking which family it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vae.files import PretrainedMixin
from vae.pyramid import scale_masks

from .labels import check_class_labels


class ScaleWiseModel(PretrainedMixin, nn.Module):
    """Base of FlowAR and VAR: labels, sampling options, and the hooks of the sampling engine.

    A family sets ``model_type`` and ``config_class`` (files), ``sampling_class`` (its options dataclass,
    whose saved defaults are ``config.sampling``), ``interchangeable_fields`` (the config fields two models
    must share to decode one image together), ``training_data`` and implements :meth:`stepper`,
    :meth:`canvas`, :meth:`check_noise`, :meth:`noise_from_seeds`, :meth:`known_regions`,
    :meth:`check_training_source` and :meth:`training_inputs`.
    """

    sampling_class: type
    interchangeable_fields: tuple[str, ...]
    training_data: str  # what the trainer feeds it: "latents" (VAE) or "tokens" (VQ token maps)

    @property
    def device(self) -> torch.device:
        return self.class_emb.weight.device

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def check_labels(self, class_labels, batch_size: int | None = None, *, allow_null: bool = False) -> torch.Tensor:
        """Validated (B,) long labels on the model's device (see ``flowar.labels.check_class_labels``)."""
        return check_class_labels(class_labels, batch_size, num_classes=self.config.num_classes, device=self.device,
                                  allow_null=allow_null)

    def sampling_options(self, sampling=None, **overrides):
        """The options of one sampling call: ``sampling`` (default: the saved ``config.sampling``) with
        ``overrides`` applied, validated. An unconditional model samples unguided: its saved guidance is
        ignored, and an explicit guidance_scale other than 1 is refused."""
        base = self.config.sampling if sampling is None else sampling
        if not isinstance(base, self.sampling_class):
            raise ValueError(f"sampling must be a {self.sampling_class.__name__}, got {type(base).__name__}")
        options = base.replace(**overrides)
        options.check_model(self.config)
        if self.config.unconditional and options.guided:
            if sampling is None and overrides.get("guidance_scale") is None and overrides.get("var_cfg") is None:
                return options.replace(guidance_scale=1.0)
            raise ValueError(f"guidance_scale must be 1 for an unconditional model (num_classes=0), got "
                             f"{options.guidance_scale}")
        return options

    def cache_dtype(self, device: torch.device) -> torch.dtype:
        """The KV cache's dtype: autocast's where it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.class_emb.weight.dtype

    def check_compatible(self, other) -> None:
        """Raise ValueError unless ``other`` can share one sampling run with this model (same family, the
        ``interchangeable_fields``, and device)."""
        if type(other) is not type(self):
            raise ValueError(f"draft_model and refine_model must be models of one family, got "
                             f"{type(self).__name__} and {type(other).__name__}")
        fields = self.interchangeable_fields
        differ = [f"{name}: {getattr(self.config, name)} vs {getattr(other.config, name)}"
                  for name in fields if getattr(self.config, name) != getattr(other.config, name)]
        if differ:
            raise ValueError("draft_model and refine_model must share " + ", ".join(fields) + " to decode together; "
                             "they differ in " + "; ".join(differ))
        if self.device != other.device:
            raise ValueError(f"draft_model and refine_model must be on one device, got {self.device} and {other.device}")

    def compile_for_sampling(self, *, mode: str | None = None, dynamic: bool | None = None) -> "ScaleWiseModel":
        """Compile, in place, the modules sampling spends its time in (:meth:`sampling_hot_modules`), with
        ``torch.compile`` through ``nn.Module.compile``: parameter names and state-dict keys stay as they are,
        so saving, loading and training the model are unchanged. Returns the model.

        mode: torch.compile's mode; None picks "reduce-overhead" (CUDA graphs: the head is called dozens of
        times per scale on small batches, where kernel-launch latency dominates) on CUDA, and "default" on
        other devices. dynamic: torch.compile's; None lets torch make a dimension dynamic once a second size of
        it is seen, so the scales' token counts and the guided (doubled) batch do not each compile a graph.
        The first sampling call compiles (tens of seconds on a CPU); later calls run the compiled code.
        """
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        for module in self.sampling_hot_modules():
            module.compile(mode=mode, dynamic=dynamic)
        return self

    # ---- the family's hooks
    def sampling_hot_modules(self) -> list[nn.Module]:
        """The modules :meth:`compile_for_sampling` compiles: those whose calls have no Python-side state
        (the KV cache's bookkeeping stays eager)."""
        raise NotImplementedError

    def stepper(self, labels: torch.Tensor, options, *, timed: bool = False):
        """A stepper (``flowar.sampling.Stepper``) sampling ``labels`` (B,) (null class allowed) with ``options``."""
        raise NotImplementedError

    def canvas(self, batch: int, autoencoder=None, options=None):
        """An empty canvas (``flowar.sampling.Canvas``) for ``batch`` images sampled with ``options``."""
        raise NotImplementedError

    def sampled_scales(self, options) -> tuple[int, ...]:
        """The sides a run with ``options`` samples: the config's, unless the family samples other lists."""
        return self.config.scales

    def check_noise(self, noise: list[torch.Tensor], batch: int, options=None) -> None:
        """Raise ValueError unless ``noise`` is valid per-scale randomness for ``batch`` images (sampled with
        ``options``)."""
        raise NotImplementedError

    def noise_from_seeds(self, seeds: list[int], options=None) -> list[torch.Tensor]:
        """Per-scale randomness (of the sides sampled with ``options``) in which row b is drawn from ``seeds[b]``
        alone (on the CPU, so that it is the same on any device): an image then does not depend on its batch."""
        raise NotImplementedError

    @property
    def latent_side(self) -> int:
        """The side of the latent (VAR: the token map) a sample of the model's own scales decodes from; editing
        takes images and masks of this side times the autoencoder's downsampling (or of this side)."""
        return self.config.scales[-1]

    def edit_masks(self, mask: torch.Tensor, *, mask_resize: str = "area",
                   keep_scales: int = 0) -> list[torch.Tensor]:
        """Boolean keep maps, one per scale, from a keep mask (B, 1, H, W) in [0, 1] (1 keeps the image): for a
        pyramid of scales, the mask resized to each scale's side (``vae.pyramid.scale_masks``)."""
        return scale_masks(mask, self.config.scales, mask_resize=mask_resize, keep_scales=keep_scales)

    def known_regions(self, autoencoder, images: torch.Tensor, keep: list[torch.Tensor]) -> list:
        """The known region of each scale (``flowar.sampling.Known``) for images (B, 3, H, W) in [-1, 1] and
        boolean keep maps, one per scale (:meth:`edit_masks`; (B, s, s) for a pyramid), for editing."""
        raise NotImplementedError

    def check_training_source(self, source) -> None:
        """Raise ValueError unless the trainer's data source (``train.latents``) can feed this model."""
        raise NotImplementedError

    def check_source_shape(self, source, channels: int, *, data: str, fields: str) -> None:
        """For a family trained on maps of ``channels`` x latent_side x latent_side: raise ValueError, naming the
        ``data`` ("latents", "features") and the config ``fields`` to set, unless the source's items have that shape."""
        side = self.latent_side
        if tuple(source.latent_shape) != (channels, side, side):
            raise ValueError(f"the data's {data} are {tuple(source.latent_shape)} but the model expects "
                             f"({channels}, {side}, {side}); set {fields} to match")

    def training_inputs(self, autoencoder) -> dict:
        """Keyword arguments of ``forward`` besides the data and labels (VAR: its tokenizer)."""
        raise NotImplementedError
