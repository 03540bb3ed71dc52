"""VAR's multi-scale residual VQ tokenizer (``vae_ch160v4096z32``): its architecture under the authors' key
names, the scale-wise quantisation, the transformer's inputs, and a training forward.

An image goes through a VQGAN-style CNN to a latent ``f`` of side S (16 at 256 px) and ``code_dim`` channels.
Scale by scale (sides ``s_1 < ... < s_K = S``) the part of ``f`` not yet explained, ``f_rest``, is area-pooled
to ``s_k`` (the last scale is taken as it is), each pooled vector picks its nearest code (L2), and the codes'
contribution ``h_k = phi_k(upsample(embed(idx_k)))`` (bicubic to S, the last scale as it is) is added to the
running sum ``f_hat`` and taken off ``f_rest``. ``phi_k(h) = (1 - r) h + r conv3x3(h)``, r = 0.5. The decoder
sees ``f_hat`` after all K scales.

Which phi conv a scale uses: scale k sits at ``k / (K - 1)`` in [0, 1]; with n convs the conv whose tick is the
nearest (the first on a tie) is used, ticks being ``linspace(1/(3n), 1 - 1/(3n), n)`` for n = 4, i.e.
1/12, 13/36, 23/36, 11/12, and ``linspace(1/(2n), 1 - 1/(2n), n)`` otherwise (the authors' rule, 4 included).
With the release's ten scales, k = 2 and k = 7 (sides 3 and 10) lie exactly halfway between two ticks in real
numbers; the float values of numpy's linspace decide (convs 1 and 3), so the ticks are computed with numpy as in
the authors' code.
``phi_sharing``: "partial" (``phi_count`` convs, the release uses 4), "shared" (one conv for every scale),
"none" (nothing shared: one conv per scale). ``phi_ratio = 0`` makes phi the identity (no conv weights).

The transformer <-> tokenizer interface (the VAR transformer never owns tokenizer weights; it is handed one):

- attributes ``config``, ``scales``, ``codebook_size`` (V), ``code_dim`` (Cvae), ``downsample``;
- ``encode_indices(images) -> [LongTensor (B, s_k, s_k)]``, ``indices_to_f_hat(indices) -> (B, Cvae, S, S)``;
- ``decode_indices(indices)`` / ``decode_f_hat(f_hat)`` -> images (B, 3, H, W) in [-1, 1];
- ``teacher_forcing_inputs(indices) -> (B, sum_{k>=2} s_k^2, Cvae)``: the running ``f_hat`` after scale k,
  area-pooled to ``s_{k+1}`` and flattened row-major, for k = 1..K-1, concatenated;
- ``accumulate(k, f_hat, indices_k) -> (f_hat_new, next_input or None)`` for sampling, scale by scale;
- ``embed_codes(indices_k) -> (B, Cvae, s_k, s_k)``.

Loading the authors' file: ``MultiScaleVQVAE.from_released("vae_ch160v4096z32.pth")`` (read with
``weights_only=True``). Its ``quantize.ema_vocab_hit_SV`` buffer (running code-hit counts per scale) is kept as
a buffer of the same name (statistics only, unused by encoding and decoding); loaded into a config with another
number of scales it is replaced by zeros, as the authors' loader does. VAR's 512 px models reuse the file with
ten other sides: ``from_released(path, get_msvq_preset("vae_ch160v4096z32", scales=(1, 2, 3, 4, 6, 9, 13, 18,
24, 32)))``. ``python -m vae.msvq convert SRC.pth DST_FOLDER [--scales ...]`` writes our release format
(config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import ConfigMixin, PretrainedMixin, load_state_strict, read_torch_state_dict

PHI_SHARING = ("partial", "shared", "none")
RECON_LOSSES = ("l1", "l2")
MODEL_TYPE = "multiscale_vq"


# ---------------------------------------------------------------------------------------------- config
@dataclass
class MultiScaleVQConfig(ConfigMixin):
    """Architecture of a multi-scale residual VQ-VAE; exactly what ``config.json`` holds."""

    ch: int = 160  # width of the first CNN level
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multipliers per level; downsample = 2 ** (levels - 1)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    code_dim: int = 32  # Cvae: channels of the latent f and of every code (the CNN's z_channels)
    codebook_size: int = 4096  # V, one codebook shared by all scales
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map sides, last = latent side S
    beta: float = 0.25  # commitment weight
    phi_sharing: str = "partial"  # "partial" | "shared" | "none" (one conv per scale)
    phi_count: int = 4  # convs of "partial"
    phi_ratio: float = 0.5  # phi(h) = (1 - r) h + r conv(h); 0 = identity
    image_channels: int = 3
    quant_conv_kernel: int = 3  # quant_conv / post_quant_conv
    attn_last_level: bool = True  # self-attention after each resnet block of the lowest-resolution level
    attn_mid: bool = True  # self-attention between the two middle resnet blocks
    norm_num_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.scales = tuple(int(s) for s in self.scales)
        for name in ("ch", "num_res_blocks", "code_dim", "codebook_size", "phi_count", "image_channels",
                     "norm_num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if len(self.scales) < 2 or self.scales[0] < 1 or any(b <= a for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"scales must be at least two strictly increasing positive sides, got {self.scales}")
        if self.phi_sharing not in PHI_SHARING:
            raise ValueError(f"phi_sharing must be one of {PHI_SHARING}, got {self.phi_sharing!r}")
        if not 0.0 <= self.phi_ratio <= 1.0:
            raise ValueError(f"phi_ratio must be in [0, 1], got {self.phi_ratio}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.quant_conv_kernel < 1 or self.quant_conv_kernel % 2 == 0:
            raise ValueError(f"quant_conv_kernel must be a positive odd int, got {self.quant_conv_kernel}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_num_groups for w in widths):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every level width {widths}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def num_phi(self) -> int:
        """Number of phi convs (0 when phi is the identity)."""
        if self.phi_ratio == 0:
            return 0
        return {"shared": 1, "partial": self.phi_count, "none": len(self.scales)}[self.phi_sharing]

    def phi_index(self, k: int) -> int:
        """Which phi conv scale ``k`` (0-based) uses: the tick nearest to k / (K - 1)."""
        n = {"shared": 1, "partial": self.phi_count, "none": len(self.scales)}[self.phi_sharing]
        return nearest_tick(k / (len(self.scales) - 1), n)



def nearest_tick(position: float, n: int) -> int:
    """Index of the tick nearest to ``position`` in [0, 1] among n ticks (the first one on a tie)."""
    if n == 1:
        return 0
    # np.linspace for the ticks so that they are bit-for-bit the authors' (ties are decided by them).
    margin = 1 / (3 * n) if n == 4 else 1 / (2 * n)
    ticks = np.linspace(margin, 1 - margin, n)
    return int(np.argmin(np.abs(ticks - position)))


MSVQ_PRESETS: dict[str, MultiScaleVQConfig] = {
    # The released tokenizer of VAR (vae_ch160v4096z32.pth) with its 256 px scales; for the 512 px models pass
    # scales=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32).
    "vae_ch160v4096z32": MultiScaleVQConfig(),
    # Bundled MNIST at 32 px (train.train_tokenizer; flowar's "var-tiny" is built on it): downsample 4 -> 8x8 latents,
    # four doubling scales, a 64-code book (500 held-out digits give 500 tokens at scale 1, so half of the codes
    # can be used there). Narrow (16-32-32 channels) so that a CPU trains it in minutes. beta 0.05 instead of VAR's
    # 0.25: the commitment term pulls the encoder's map towards every scale's running f_hat, the 1x1 one (a
    # constant map) included, and on digits, mostly background, that collapses the coarse scales onto a few
    # codes (docs/ablations.md#var-tokenizer has the measurements).
    "mnist": MultiScaleVQConfig(
        ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, code_dim=16, codebook_size=64, scales=(1, 2, 4, 8), beta=0.05,
        phi_sharing="partial", phi_count=4, attn_last_level=False, attn_mid=True, norm_num_groups=8,
    ),
    # For tests: every part of the release (attention, partial phi, non-doubling scales) at a few k parameters.
    "tiny": MultiScaleVQConfig(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, code_dim=8, codebook_size=32, scales=(1, 2, 3, 4),
        norm_num_groups=8,
    ),
}


def get_msvq_preset(name: str, **overrides) -> MultiScaleVQConfig:
    """A copy of a tokenizer preset with optional field overrides."""
    if name not in MSVQ_PRESETS:
        raise ValueError(f"name must be one of {sorted(MSVQ_PRESETS)}, got {name!r}")
    return dataclasses.replace(MSVQ_PRESETS[name], **overrides)


# ------------------------------------------------------------------------------------------- CNN parts
def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """One-head self-attention over all pixels (1x1 convs for qkv and the output), with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # scores scaled by C ** -0.5
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel right and bottom (halves even sides exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{i}`` resnets, ``attn.{i}`` after them (or none), an optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample_name: str | None,
                 resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self._resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self._resample_name)(h) if self._resample_name else h


class _Middle(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """VQGAN encoder: conv_in, ``down.{level}`` from the image side down, middle, norm/SiLU/conv_out."""

    def __init__(self, config: MultiScaleVQConfig):
        super().__init__()
        c, groups, last = config, config.norm_num_groups, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(c.image_channels, c.ch, 3, padding=1)
        width = c.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(width, c.ch * mult, groups))
                width = c.ch * mult
                if level == last and c.attn_last_level:
                    attns.append(AttnBlock(width, groups))
            resample = Downsample(width) if level != last else None
            self.down.append(_Level(blocks, attns, "downsample", resample))
        self.mid = _Middle(width, groups, c.attn_mid)
        self.norm_out = _group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, c.code_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """VQGAN decoder. ``up.{level}`` is indexed like the encoder's levels (0 = image side) and run from the
    lowest resolution up; each has ``num_res_blocks + 1`` resnets."""

    def __init__(self, config: MultiScaleVQConfig):
        super().__init__()
        c, groups, last = config, config.norm_num_groups, len(config.ch_mult) - 1
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.code_dim, width, 3, padding=1)
        self.mid = _Middle(width, groups, c.attn_mid)
        levels = []
        for level in reversed(range(len(c.ch_mult))):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, c.ch * c.ch_mult[level], groups))
                width = c.ch * c.ch_mult[level]
                if level == last and c.attn_last_level:
                    attns.append(AttnBlock(width, groups))
            resample = Upsample(width) if level != 0 else None
            levels.append(_Level(blocks, attns, "upsample", resample))
        self.up = nn.ModuleList(levels[::-1])  # stored by level, image side first
        self.norm_out = _group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, c.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------- quantizer
class Phi(nn.Conv2d):
    """3x3 conv blended with its input: ``(1 - ratio) h + ratio conv(h)``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = float(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


_IDENTITY = nn.Identity()


class MultiScaleQuantizer(nn.Module):
    """One codebook for all scales, the phi convs and the scale-wise residual quantisation of a latent."""

    def __init__(self, config: MultiScaleVQConfig):
        super().__init__()
        self.config = config
        self.scales = config.scales
        self.embedding = nn.Embedding(config.codebook_size, config.code_dim)
        # Running (EMA) code-hit counts per scale, updated by the training forward; kept under the authors'
        # name so their files load unchanged.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(config.scales), config.codebook_size))
        self.hit_updates = 0
        convs = [Phi(config.code_dim, config.phi_ratio) for _ in range(config.num_phi)]
        # The authors' key names: quant_resi.qresi (shared), quant_resi.qresi_ls.{i} (partial),
        # quant_resi.{i} (one per scale).
        if config.phi_sharing == "none":
            self.quant_resi = nn.ModuleList(convs)
        else:
            self.quant_resi = nn.Module()
            if convs and config.phi_sharing == "shared":
                self.quant_resi.qresi = convs[0]
            elif convs:
                self.quant_resi.qresi_ls = nn.ModuleList(convs)
        self._phi_of_scale = [config.phi_index(k) for k in range(len(config.scales))]

    def phi(self, k: int) -> nn.Module:
        """The phi of scale ``k`` (0-based); the identity when ``phi_ratio`` is 0."""
        if self.config.num_phi == 0:
            return _IDENTITY
        bank = self.quant_resi
        if self.config.phi_sharing == "shared":
            return bank.qresi
        convs = bank.qresi_ls if self.config.phi_sharing == "partial" else bank
        return convs[self._phi_of_scale[k]]

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) vectors -> (B, h, w) indices of the nearest codes (squared L2)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), row-major over (b, y, x)
        codes = self.embedding.weight.detach().to(flat.dtype)
        # |z|^2 + |e|^2 - 2 z.e in one fused multiply-add, as the authors compute it, so that near-ties
        # break the same way.
        dist = torch.addmm(flat.square().sum(1, keepdim=True) + codes.square().sum(1), flat, codes.T,
                           beta=1, alpha=-2)  # (N, V)
        return dist.argmin(1).view(b, h, w)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, s, s) indices -> (B, C, s, s) codes."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def contribution(self, k: int, indices: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """h_k = phi_k(codes bicubic-upsampled to S); the last scale is not resampled. -> (B, C, S, S).

        ``indices`` (B, s, s) are looked up in the codebook; float (B, C, s, s) are code vectors already
        (VAR's smoothed sampling mixes them)."""
        h = self.embed(indices) if indices.dtype == torch.long else indices
        if dtype is not None:
            h = h.to(dtype)
        if k != len(self.scales) - 1:
            side = self.scales[-1]
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(k)(h.contiguous())

    def _pool(self, k: int, x: torch.Tensor) -> torch.Tensor:
        s = self.scales[k]
        return x if k == len(self.scales) - 1 else F.interpolate(x, size=(s, s), mode="area")

    @torch.no_grad()
    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, C, S, S) latent -> (indices per scale [(B, s_k, s_k)], f_hat (B, C, S, S))."""
        rest = f.clone()
        f_hat = torch.zeros_like(f)
        indices = []
        for k in range(len(self.scales)):
            idx = self.nearest_codes(self._pool(k, rest))
            h = self.contribution(k, idx, dtype=f.dtype)
            f_hat.add_(h)
            rest.sub_(h)
            indices.append(idx)
        return indices, f_hat

    def forward(self, f: torch.Tensor) -> dict:
        """Training quantisation of a (B, C, S, S) latent over all scales.

        Returns a dict: ``f_hat`` with a straight-through gradient to ``f``; ``commitment`` and ``codebook``, the
        means over scales of mse(f_hat_k, f) with the gradient to the encoder and to the codes/phi respectively
        (f_hat_k = running sum after scale k, the authors' losses; the commitment one is not yet multiplied by
        beta); ``counts`` (K, V) code hits of this batch per scale; ``residuals``, the detached vectors that were
        quantised at each scale, (B * s_k * s_k, C) each (candidates for re-initialising dead codes).
        """
        target = f.detach()
        rest = target.clone()
        f_hat = torch.zeros_like(target)
        num_scales, vocab = len(self.scales), self.config.codebook_size
        counts = torch.zeros(num_scales, vocab, dtype=torch.long, device=f.device)
        commitment = codebook = f.new_zeros(())
        residuals = []
        for k in range(num_scales):
            z = self._pool(k, rest)
            idx = self.nearest_codes(z)
            counts[k] = idx.flatten().bincount(minlength=vocab)
            residuals.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
            h = self.contribution(k, idx, dtype=f.dtype)
            f_hat = f_hat + h
            rest = rest - h.detach()
            commitment = commitment + F.mse_loss(f_hat.detach(), f)
            codebook = codebook + F.mse_loss(f_hat, target)
        if self.training:
            self._update_hit_ema(counts)
        straight_through = f + (f_hat - target).detach()
        return dict(f_hat=straight_through, commitment=commitment / num_scales, codebook=codebook / num_scales,
                    counts=counts, residuals=residuals)

    @torch.no_grad()
    def _update_hit_ema(self, counts: torch.Tensor) -> None:
        # The authors' schedule: copy the first counts, then decay 0.9 for 100 updates, 0.99 after.
        hits = counts.to(self.ema_vocab_hit_SV.dtype)
        if self.hit_updates == 0:
            self.ema_vocab_hit_SV.copy_(hits)
        else:
            decay = 0.9 if self.hit_updates < 100 else 0.99
            self.ema_vocab_hit_SV.mul_(decay).add_(hits * (1 - decay))
        self.hit_updates += 1


# --------------------------------------------------------------------------------------------- the VAE
@dataclass
class MultiScaleVQOutput:
    """What the training forward returns. ``loss = recon_loss + vq_loss``,
    ``vq_loss = beta * commitment_loss + codebook_loss``."""

    reconstruction: torch.Tensor  # (B, 3, H, W), not clamped
    f_hat: torch.Tensor  # (B, Cvae, S, S), straight-through
    loss: torch.Tensor
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor
    commitment_loss: torch.Tensor  # unweighted
    codebook_loss: torch.Tensor
    code_counts: torch.Tensor  # (K, V) long: hits of each code at each scale in this batch
    residuals: list[torch.Tensor]  # per scale (B * s_k^2, Cvae), detached


def _check_indices(name: str, indices: torch.Tensor, side: int) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long:
        raise ValueError(f"{name} must be a LongTensor, got {type(indices).__name__} "
                         f"{getattr(indices, 'dtype', '')}")
    if indices.ndim != 3 or tuple(indices.shape[1:]) != (side, side):
        raise ValueError(f"{name} must be (B, {side}, {side}), got {tuple(indices.shape)}")


class MultiScaleVQVAE(PretrainedMixin, nn.Module):
    """VAR's multi-scale residual VQ-VAE: images <-> one token map per scale."""

    model_type = MODEL_TYPE
    config_class = MultiScaleVQConfig

    def __init__(self, config: MultiScaleVQConfig | None = None):
        super().__init__()
        config = MultiScaleVQConfig() if config is None else config
        if not isinstance(config, MultiScaleVQConfig):
            raise ValueError(f"config must be a MultiScaleVQConfig, got {type(config).__name__}")
        self.config = config
        self.scales: tuple[int, ...] = config.scales
        self.codebook_size: int = config.codebook_size
        self.code_dim: int = config.code_dim
        self.downsample: int = config.downsample
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        k = config.quant_conv_kernel
        self.quant_conv = nn.Conv2d(config.code_dim, config.code_dim, k, padding=k // 2)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.code_dim, k, padding=k // 2)
        self.quantize = MultiScaleQuantizer(config)

    # The LatentAutoencoder protocol: the quantised latent f_hat is the latent, unscaled.
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
    def image_size(self) -> int:
        return self.scales[-1] * self.downsample

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors (V, Cvae), shared by all scales."""
        return self.quantize.embedding.weight

    def _check_images(self, images: torch.Tensor) -> None:
        side, channels = self.image_size, self.config.image_channels
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (channels, side, side):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, {channels}, {side}, {side}) for scales {self.scales} and "
                             f"downsample {self.downsample}, got {shape}")

    def _check_index_list(self, indices, *, allow_short: bool = False) -> None:
        count = len(self.scales)
        if not isinstance(indices, (list, tuple)) or not (
            len(indices) == count or (allow_short and len(indices) == count - 1)
        ):
            got = len(indices) if isinstance(indices, (list, tuple)) else type(indices).__name__
            raise ValueError(f"indices must be a list of {count} token maps (one per scale {self.scales}), got {got}")
        for k, idx in enumerate(indices):
            _check_indices(f"indices[{k}]", idx, self.scales[k])
        if len({idx.shape[0] for idx in indices}) != 1:
            raise ValueError(f"indices must share one batch size, got {[idx.shape[0] for idx in indices]}")

    # ---- encoding
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the latent f before quantisation, (B, Cvae, S, S)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode_to_indices_and_f_hat(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, H, W) -> ([LongTensor (B, s_k, s_k)] per scale, f_hat (B, Cvae, S, S))."""
        return self.quantize.quantize(self.encode_features(images))

    def encode_indices(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> one LongTensor (B, s_k, s_k) per scale."""
        return self.encode_to_indices_and_f_hat(images)[0]

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> the quantised latent f_hat (B, Cvae, S, S). ``generator`` is unused (deterministic)."""
        return self.encode_to_indices_and_f_hat(images)[1]

    # ---- tokens -> latent
    def embed_codes(self, indices_k: torch.Tensor) -> torch.Tensor:
        """(B, s, s) indices -> (B, Cvae, s, s) code vectors."""
        if not isinstance(indices_k, torch.Tensor) or indices_k.dtype != torch.long or indices_k.ndim != 3:
            raise ValueError(f"indices_k must be a LongTensor (B, s, s), got {getattr(indices_k, 'shape', indices_k)}")
        return self.quantize.embed(indices_k)

    def accumulate(
        self, k: int, f_hat: torch.Tensor | None, indices_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale ``k``'s tokens (B, s_k, s_k) to ``f_hat`` (B, Cvae, S, S) (None = zeros). ``indices_k``
        may instead be float code vectors (B, Cvae, s_k, s_k), e.g. mixtures of :attr:`codebook` rows.

        Returns the new f_hat (a new tensor; ``f_hat`` is not modified) and the next scale's transformer input
        (B, s_{k+1}^2, Cvae), the new f_hat area-pooled to s_{k+1} and flattened row-major; None after the last
        scale.
        """
        count, side = len(self.scales), self.scales[-1]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < count:
            raise ValueError(f"k must be an int in [0, {count}), got {k!r}")
        if isinstance(indices_k, torch.Tensor) and indices_k.is_floating_point():
            s_k = self.scales[k]
            if indices_k.ndim != 4 or tuple(indices_k.shape[1:]) != (self.code_dim, s_k, s_k):
                raise ValueError(f"code vectors must be (B, {self.code_dim}, {s_k}, {s_k}), got {tuple(indices_k.shape)}")
        else:
            _check_indices("indices_k", indices_k, self.scales[k])
        batch = indices_k.shape[0]
        if f_hat is None:
            f_hat = self.quantize.embedding.weight.new_zeros(batch, self.code_dim, side, side)
        elif tuple(f_hat.shape) != (batch, self.code_dim, side, side):
            raise ValueError(f"f_hat must be (B, {self.code_dim}, {side}, {side}) with B={batch}, "
                             f"got {tuple(f_hat.shape)}")
        f_hat = f_hat + self.quantize.contribution(k, indices_k, dtype=f_hat.dtype)
        if k == count - 1:
            return f_hat, None
        nxt = self.scales[k + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)

    def indices_to_f_hat(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """[(B, s_k, s_k)] for all K scales -> f_hat (B, Cvae, S, S), the sum of every scale's contribution."""
        self._check_index_list(indices)
        f_hat = None
        for k, idx in enumerate(indices):
            h = self.quantize.contribution(k, idx)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def teacher_forcing_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Transformer inputs of scales 2..K from ground-truth tokens: (B, sum_{k>=2} s_k^2, Cvae).

        ``indices`` holds all K token maps (the last one is not needed and may be left out).
        """
        self._check_index_list(indices, allow_short=True)
        inputs, f_hat = [], None
        for k in range(len(self.scales) - 1):
            h = self.quantize.contribution(k, indices[k])
            f_hat = h if f_hat is None else f_hat + h
            nxt = self.scales[k + 1]
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    # ---- decoding
    def decode_f_hat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, S, S) -> images (B, 3, H, W) clamped to [-1, 1]."""
        side = self.scales[-1]
        if not isinstance(f_hat, torch.Tensor) or f_hat.ndim != 4 or tuple(f_hat.shape[1:]) != (self.code_dim, side, side):
            raise ValueError(f"f_hat must be (B, {self.code_dim}, {side}, {side}), got {getattr(f_hat, 'shape', f_hat)}")
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_f_hat(latents)

    def decode_indices(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """[(B, s_k, s_k)] per scale -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_f_hat(self.indices_to_f_hat(indices))

    # ---- training
    def forward(self, images: torch.Tensor, *, recon: str = "l2") -> MultiScaleVQOutput:
        """Training step: encode, quantise every scale with a straight-through gradient, decode, and the losses.

        ``recon``: "l2" (mean squared error) or "l1" reconstruction loss on images in [-1, 1].
        """
        if recon not in RECON_LOSSES:
            raise ValueError(f"recon must be one of {RECON_LOSSES}, got {recon!r}")
        f = self.encode_features(images)
        q = self.quantize(f)
        reconstruction = self.decoder(self.post_quant_conv(q["f_hat"]))
        recon_loss = (F.mse_loss if recon == "l2" else F.l1_loss)(reconstruction, images)
        vq_loss = self.config.beta * q["commitment"] + q["codebook"]
        return MultiScaleVQOutput(
            reconstruction=reconstruction, f_hat=q["f_hat"], loss=recon_loss + vq_loss, recon_loss=recon_loss,
            vq_loss=vq_loss, commitment_loss=q["commitment"], codebook_loss=q["codebook"],
            code_counts=q["counts"], residuals=q["residuals"],
        )

    @torch.no_grad()
    def reset_codes(self, codes: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite codebook rows ``codes`` (N,) with ``vectors`` (N, Cvae) (re-initialising dead codes)."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 1 or vectors.shape != (codes.numel(), self.code_dim):
            raise ValueError(f"vectors must be ({codes.numel()}, {self.code_dim}) for codes of shape "
                             f"{tuple(codes.shape)}, got {tuple(vectors.shape)}")
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got {codes.tolist()}")
        weight = self.quantize.embedding.weight
        weight[codes.to(weight.device)] = vectors.to(weight)

    # ---- loading the authors' file (save_pretrained / from_pretrained: vae.files.PretrainedMixin)
    @classmethod
    def from_released(
        cls,
        path: str | os.PathLike,
        config: MultiScaleVQConfig | str = "vae_ch160v4096z32",
        *,
        map_location: str | torch.device = "cpu",
    ) -> "MultiScaleVQVAE":
        """Load the authors' ``vae_ch160v4096z32.pth`` (their key names) into ``config`` (a preset name or a
        config; pass ``get_msvq_preset("vae_ch160v4096z32", scales=...)`` for the 512 px scales)."""
        if isinstance(config, str):
            config = get_msvq_preset(config)
        state = read_torch_state_dict(path, map_location=map_location, wrappers=("model", "state_dict"))
        model = cls(config)
        load_state_strict(model, convert_released_state_dict(state, config), source=f"path {str(path)!r}")
        return model.eval()


# ------------------------------------------------------------------------------------------ file helpers
def convert_released_state_dict(state: dict, config: MultiScaleVQConfig) -> dict:
    """The authors' names are ours; only per-scale hit statistics of another number of scales are replaced by
    zeros of the right shape (they are statistics, not weights)."""
    state = dict(state)
    hits = state.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.ndim == 2 and hits.shape[0] != len(config.scales):
        state["quantize.ema_vocab_hit_SV"] = hits.new_zeros(len(config.scales), hits.shape[1])
    return state


# ------------------------------------------------------------------------------------------------- CLI
def convert(src: str | os.PathLike, dst: str | os.PathLike, *, scales: tuple[int, ...] | None = None) -> Path:
    """Read the authors' ``.pth`` and write our folder (config.json + model.safetensors)."""
    overrides = {} if scales is None else {"scales": tuple(scales)}
    model = MultiScaleVQVAE.from_released(src, get_msvq_preset("vae_ch160v4096z32", **overrides))
    return model.save_pretrained(dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vae.msvq", description="VAR's multi-scale VQ tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert the authors' vae_ch160v4096z32.pth into a config.json + safetensors folder")
    p.add_argument("src", help="the authors' .pth (a state dict with their key names)")
    p.add_argument("dst", help="folder to write into")
    p.add_argument("--scales", default=None,
                   help="comma-separated token-map sides (default the 256 px ones; 512 px: 1,2,3,4,6,9,13,18,24,32)")
    args = parser.parse_args(argv)
    try:
        scales = None if args.scales is None else tuple(int(s) for s in args.scales.split(","))
    except ValueError:
        parser.error(f"--scales must be comma-separated ints, got {args.scales!r}")
    try:
        folder = convert(args.src, args.dst, scales=scales)
    except (ValueError, FileNotFoundError) as err:
        print(f"vae.msvq convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder} (load with MultiScaleVQVAE.from_pretrained({str(folder)!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
