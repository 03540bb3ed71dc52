"""FlexVAR's tokenizer (``FlexVAE.pth``): LlamaGen's VQ-16 with a cosine codebook, quantised at any side.

An image goes through a VQGAN-style CNN to ``z_channels`` (256) and a 1x1 ``quant_conv`` to a feature map of
``code_dim`` (32) channels and side S = image_size / 16. FlexVAR has no residual: scale k's target is the feature
map area-resized to s_k (taken as it is at s_k = S) and quantised on its own, each vector picking the code of
highest cosine similarity among V = 8912 (codes and vectors are L2-normalised before the search, and the code
vectors the model hands on are the normalised ones). Any increasing list of sides works, which is what lets
FlexVAR train on random lists and sample at sides it never saw.

The transformer <-> tokenizer interface:

- ``encode_indices(images, scales) -> [LongTensor (B, s_k, s_k)]``, or ``indices_from_features`` on cached
  ``encode_features`` output (``encode`` is the same map, so the latent cache stores features);
- ``next_input(ids_k, s_{k+1}) -> (B, s_{k+1}^2, code_dim)``: scale k's code vectors bicubic-resized to the next
  side, row-major tokens (what sampling feeds the transformer);
- ``teacher_forcing_inputs(indices, scales) -> (B, sum_{k>=2} s_k^2, code_dim)``: the same for every scale but
  the last, concatenated (training);
- ``decode(codes)`` / ``decode_indices(ids)``: the last scale's code map -> images (not clamped, as the authors'
  ``decode_code``; the pipeline clamps).

Loading the authors' file: ``FlexVQVAE.from_released("FlexVAE.pth")`` (read with ``weights_only=True``, weights
under ``"model"``). The module names are the authors'; only their ``quantize.codebook_used`` buffer (the ids of
recent training batches, a usage statistic) is dropped.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import ConfigMixin, PretrainedMixin, load_state_strict, read_torch_state_dict
from .msvq import Downsample, ResnetBlock, Upsample

MODEL_TYPE = "flexvq"
# In the authors' checkpoints, not in ours: a ring buffer of recently chosen ids, kept for a usage statistic.
RELEASED_ONLY_KEYS = ("quantize.codebook_used",)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class FlexVQConfig(ConfigMixin):
    """Architecture of the FlexVAR tokenizer; exactly what ``config.json`` holds."""

    image_channels: int = 3
    ch: int = 128  # width of the first CNN level
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multipliers per level; downsample = 2 ** (levels - 1)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 256  # the encoder's output, taken to code_dim by the 1x1 quant_conv
    codebook_size: int = 8912  # V
    code_dim: int = 32  # channels of the features and of every code
    image_size: int = 256  # the side encode() accepts
    norm_groups: int = 32  # GroupNorm groups (LlamaGen's are fixed at 32)

    def __post_init__(self):
        if not isinstance(self.ch_mult, (list, tuple)):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        self.ch_mult = tuple(self.ch_mult)
        for name in ("image_channels", "ch", "num_res_blocks", "z_channels", "codebook_size", "code_dim",
                     "image_size", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if self.ch % self.norm_groups:  # then it divides every level's width, ch * mult, too
            raise ValueError(f"norm_groups={self.norm_groups} must divide ch={self.ch}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size must be a multiple of the downsample factor {self.downsample}, "
                             f"got {self.image_size}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_side(self) -> int:
        return self.image_size // self.downsample


FLEXVQ_PRESETS: dict[str, FlexVQConfig] = {
    # The released FlexVAE.pth: LlamaGen's VQ-16 layout, 8912 codes of 32 channels, 256 px -> 16x16 features.
    "flexvae": FlexVQConfig(),
    # Digits at 32 px: downsample 4 -> 8x8 features, 64 codes of 16 channels; narrow enough to train on a CPU.
    "mnist": FlexVQConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, codebook_size=64, code_dim=16,
                          image_size=32, norm_groups=8),
}


def get_flexvq_preset(name: str, **overrides) -> FlexVQConfig:
    """A copy of a tokenizer preset with optional field overrides."""
    if name not in FLEXVQ_PRESETS:
        raise ValueError(f"name must be one of {sorted(FLEXVQ_PRESETS)}, got {name!r}")
    return dataclasses.replace(FLEXVQ_PRESETS[name], **overrides)


# ------------------------------------------------------------------------------------------- CNN parts
class AttnBlock(nn.Module):
    """One-head self-attention over all pixels with separate 1x1 q, k, v convs (LlamaGen's names), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # scores scaled by C ** -0.5
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class _Stage(nn.Module):
    """One resolution level: ``res.{i}`` resnets, each followed by ``attn.{i}`` where the level has attention,
    then the resampler (``downsample`` / ``upsample``) if any."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample_name: str | None = None,
                 resample: nn.Module | None = None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self._resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self._resample_name)(h) if self._resample_name else h


def _middle(width: int, groups: int) -> nn.Sequential:
    """resnet, attention, resnet (keys ``mid.0``, ``mid.1``, ``mid.2``)."""
    return nn.Sequential(ResnetBlock(width, width, groups), AttnBlock(width, groups), ResnetBlock(width, width, groups))


class Encoder(nn.Module):
    """conv_in, ``conv_blocks.{level}`` from the image side down (attention at the lowest resolution), the
    middle, then GroupNorm/SiLU/conv_out to ``z_channels``."""

    def __init__(self, config: FlexVQConfig):
        super().__init__()
        c, groups, last = config, config.norm_groups, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(c.image_channels, c.ch, 3, padding=1)
        width = c.ch
        stages = []
        for level, mult in enumerate(c.ch_mult):
            res, attn = [], []
            for _ in range(c.num_res_blocks):
                res.append(ResnetBlock(width, c.ch * mult, groups))
                width = c.ch * mult
                if level == last:
                    attn.append(AttnBlock(width, groups))
            stages.append(_Stage(res, attn, "downsample", Downsample(width) if level != last else None))
        self.conv_blocks = nn.ModuleList(stages)
        self.mid = _middle(width, groups)
        self.norm_out = nn.GroupNorm(groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """conv_in from ``z_channels``, the middle, ``conv_blocks`` from the lowest resolution up (index 0 is the
    lowest, with attention; each has ``num_res_blocks + 1`` resnets), then GroupNorm/SiLU/conv_out."""

    def __init__(self, config: FlexVQConfig):
        super().__init__()
        c, groups, last = config, config.norm_groups, len(config.ch_mult) - 1
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _middle(width, groups)
        stages = []
        for level in reversed(range(len(c.ch_mult))):
            res, attn = [], []
            for _ in range(c.num_res_blocks + 1):
                res.append(ResnetBlock(width, c.ch * c.ch_mult[level], groups))
                width = c.ch * c.ch_mult[level]
                if level == last:
                    attn.append(AttnBlock(width, groups))
            stages.append(_Stage(res, attn, "upsample", Upsample(width) if level != 0 else None))
        self.conv_blocks = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, c.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.conv_blocks:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CosineCodebook(nn.Module):
    """V code vectors, used L2-normalised; the search is by cosine similarity."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)

    def normalized(self) -> torch.Tensor:
        """(V, C) unit code vectors."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, C) vectors -> (N,) ids of the codes of highest cosine similarity."""
        # Below float32 the 8912-way search would tie on rounding; the authors search in float32 too.
        dtype = torch.promote_types(vectors.dtype, torch.float32)
        z = F.normalize(vectors.to(dtype), p=2, dim=-1)
        codes = F.normalize(self.embedding.weight.to(dtype), p=2, dim=-1)
        # The squared distance of unit vectors, |z|^2 + |e|^2 - 2 z.e with each squared norm as rounded and in
        # this order (the authors' arithmetic), rather than argmax of z.e: the per-code rounding of |e|^2 decides
        # near-ties, so only the same arithmetic picks the same ids.
        dist = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.einsum("nc,cv->nv", z, codes.t())
        return dist.argmin(1)


# --------------------------------------------------------------------------------------------- helpers
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scales(scales, *, max_side: int | None = None) -> tuple[int, ...]:
    limit = "" if max_side is None else f" no larger than the feature side {max_side}"
    message = f"scales must be a non-empty, strictly increasing list of positive int sides{limit}, got {scales!r}"
    if not isinstance(scales, (list, tuple)):
        raise ValueError(message)
    values = tuple(scales)
    if (not values or not all(_is_int(s) for s in values) or values[0] < 1
            or any(b <= a for a, b in zip(values, values[1:])) or (max_side is not None and values[-1] > max_side)):
        raise ValueError(message)
    return values


def _check_ids(name: str, ids, vocab: int, side: int | None = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 3:
        raise ValueError(f"{name} must be a LongTensor (B, s, s), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    if side is not None and tuple(ids.shape[1:]) != (side, side):
        raise ValueError(f"{name} must be (B, {side}, {side}), got {tuple(ids.shape)}")
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"{name} must hold code ids in [0, {vocab}), got min {int(ids.min())}, max {int(ids.max())}")


# --------------------------------------------------------------------------------------------- the VAE
class FlexVQVAE(PretrainedMixin, nn.Module):
    """FlexVAR's VQ tokenizer: images <-> feature maps, quantised at any side by cosine similarity."""

    model_type = MODEL_TYPE
    config_class = FlexVQConfig

    def __init__(self, config: FlexVQConfig | None = None):
        super().__init__()
        config = FlexVQConfig() if config is None else config
        if not isinstance(config, FlexVQConfig):
            raise ValueError(f"config must be a FlexVQConfig, got {type(config).__name__}")
        self.config = config
        self.codebook_size: int = config.codebook_size
        self.code_dim: int = config.code_dim
        self.downsample: int = config.downsample
        self.image_size: int = config.image_size
        self.latent_side: int = config.latent_side
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = CosineCodebook(config.codebook_size, config.code_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)

    # The LatentAutoencoder protocol: the continuous features are the latent, unscaled.
    @property
    def latent_channels(self) -> int:
        return self.code_dim

    @property
    def scaling_factor(self) -> float:
        return 1.0

    @property
    def shift_factor(self) -> float:
        return 0.0

    @property
    def codebook(self) -> torch.Tensor:
        """The L2-normalised code vectors (V, code_dim)."""
        return self.quantize.normalized()

    # ---- checks
    def _check_images(self, images) -> None:
        side, channels = self.image_size, self.config.image_channels
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (channels, side, side):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, {channels}, {side}, {side}), got {shape}")

    def _check_features(self, features) -> int:
        if (not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[1] != self.code_dim
                or features.shape[2] != features.shape[3]):
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a square map (B, {self.code_dim}, S, S), got {shape}")
        return features.shape[-1]

    # ---- encoding
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> continuous features (B, code_dim, S, S), before any quantisation."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, zeros): the encoder is deterministic, and as a posterior of std 0 its features go through
        the latent cache and online sources that serve a VAE's latents."""
        features = self.encode_features(images)
        return features, torch.zeros_like(features)

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`encode_features` (``generator`` is unused: encoding is deterministic)."""
        return self.encode_features(images)

    @torch.no_grad()
    def quantize_features(self, features: torch.Tensor, side: int) -> torch.Tensor:
        """(B, code_dim, S, S) features -> ids (B, side, side): area-resized to ``side`` (1 <= side <= S), then
        the code of highest cosine similarity per position."""
        full = self._check_features(features)
        if not _is_int(side) or not 1 <= side <= full:
            raise ValueError(f"side must be an int in [1, {full}] (the feature side), got {side!r}")
        z = features if side == full else F.interpolate(features, size=(side, side), mode="area")
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)  # (B * side * side, C), row-major positions
        return self.quantize.nearest(flat).view(z.shape[0], side, side)

    def indices_from_features(self, features: torch.Tensor, scales) -> list[torch.Tensor]:
        """(B, code_dim, S, S) features -> one LongTensor (B, s, s) per side of ``scales`` (increasing, <= S)."""
        scales = _check_scales(scales, max_side=self._check_features(features))
        return [self.quantize_features(features, s) for s in scales]

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor, scales) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> one LongTensor (B, s, s) per side of ``scales`` (increasing, <= S)."""
        _check_scales(scales, max_side=self.latent_side)
        return self.indices_from_features(self.encode_features(images), scales)

    # ---- tokens -> transformer inputs
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, code_dim, h, w) normalised code vectors."""
        _check_ids("ids", ids, self.codebook_size)
        # Contiguous, as the authors' lookup returns it: the decoder's convolutions pick another algorithm for
        # a permuted view, which moves the decoded images by 1e-5.
        return F.embedding(ids, self.codebook).permute(0, 3, 1, 2).contiguous()

    def next_input(self, ids: torch.Tensor, next_side: int) -> torch.Tensor:
        """Scale k's ids (B, s, s) -> the transformer's input for the next scale (B, next_side^2, code_dim):
        the code vectors bicubic-resized to ``next_side``, row-major tokens."""
        return self.resize_codes(self.embed(ids), next_side)

    def resize_codes(self, codes: torch.Tensor, next_side: int) -> torch.Tensor:
        """Code vectors (B, code_dim, s, s) (looked up, or mixed by a smooth sampler) -> the next scale's input
        (B, next_side^2, code_dim): bicubic-resized to ``next_side``, row-major tokens."""
        if not _is_int(next_side) or next_side < 1:
            raise ValueError(f"next_side must be a positive int, got {next_side!r}")
        return F.interpolate(codes, size=(next_side, next_side), mode="bicubic").flatten(2).transpose(1, 2)

    def teacher_forcing_inputs(self, indices: list[torch.Tensor], scales) -> torch.Tensor:
        """Ground-truth ids, one (B, s, s) per side of ``scales`` -> the transformer inputs of scales 2..K,
        (B, sum_{k>=2} s_k^2, code_dim): each scale's codes bicubic-resized to the next side, concatenated."""
        scales = _check_scales(scales)
        if not isinstance(indices, (list, tuple)) or len(indices) != len(scales):
            got = len(indices) if isinstance(indices, (list, tuple)) else type(indices).__name__
            raise ValueError(f"indices must be a list of {len(scales)} id maps (one per side of {scales}), got {got}")
        for k, (ids, s) in enumerate(zip(indices, scales)):
            _check_ids(f"indices[{k}]", ids, self.codebook_size, s)
        if len({ids.shape[0] for ids in indices}) != 1:
            raise ValueError(f"indices must share one batch size, got {[ids.shape[0] for ids in indices]}")
        if len(scales) == 1:
            return self.codebook.new_zeros(indices[0].shape[0], 0, self.code_dim)
        return torch.cat([self.next_input(indices[k], scales[k + 1]) for k in range(len(scales) - 1)], dim=1)

    # ---- decoding
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) code vectors -> images (B, 3, h * downsample, w * downsample), about [-1, 1]
        (not clamped)."""
        if not isinstance(codes, torch.Tensor) or codes.ndim != 4 or codes.shape[1] != self.code_dim:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must be (B, {self.code_dim}, h, w), got {shape}")
        return self.decoder(self.post_quant_conv(codes))

    def decode_indices(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids of the last scale -> images (B, 3, h * downsample, w * downsample)."""
        return self.decode(self.embed(ids))

    # ---- loading the authors' file (save_pretrained / from_pretrained: vae.files.PretrainedMixin)
    @classmethod
    def from_released(
        cls,
        path: str | os.PathLike,
        preset: FlexVQConfig | str = "flexvae",
        *,
        map_location: str | torch.device = "cpu",
    ) -> "FlexVQVAE":
        """Load the authors' ``FlexVAE.pth`` (their key names, weights under ``"model"``) into ``preset`` (a
        preset name or a config); any missing, unexpected or mis-shaped key is an error listing them."""
        if isinstance(preset, str) and preset in FLEXVQ_PRESETS:
            config = get_flexvq_preset(preset)
        elif isinstance(preset, FlexVQConfig):
            config = preset
        else:
            raise ValueError(f"preset must be one of {sorted(FLEXVQ_PRESETS)} or a FlexVQConfig, got {preset!r}")
        state = read_torch_state_dict(path, map_location=map_location, wrappers=("model", "state_dict"))
        model = cls(config)
        load_state_strict(model, convert_released_flexvq_state_dict(state), source=f"path {str(path)!r}")
        return model.eval()


def convert_released_flexvq_state_dict(state: dict) -> dict:
    """The authors' state dict in our names: theirs, less the usage statistics we do not keep."""
    return {k: v for k, v in state.items() if k not in RELEASED_ONLY_KEYS}
