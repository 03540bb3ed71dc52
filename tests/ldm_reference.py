"""Test-only LDM/MAR KL autoencoder in the original key layout, written from the architecture facts.

It exists so the KL-16 converter is checked against a model that is built the LDM way (``down``/``up``
lists, ``block``/``attn`` per level, 1x1-conv attention, decoder levels indexed from the highest
resolution) rather than against diffusers itself. Defaults are MAR's KL-16.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Two GroupNorm -> SiLU -> 3x3 conv steps, with a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, 1x1-conv projections, scores scaled by C ** -0.5."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2) for proj in (self.q, self.k, self.v))  # (B, C, HW) each
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (B, HWq, HWk)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Resample(nn.Module):
    """Stride-2 conv after (0, 1, 0, 1) zero padding (down), or nearest x2 then a 3x3 conv (up)."""

    def __init__(self, channels: int, *, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: ``block`` resnets, each followed by ``attn`` when the level has attention."""

    def __init__(self, c_in: int, c_out: int, depth: int, *, attention: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(depth))
        self.attn = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(depth if attention else 0))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Mid(nn.Module):
    """Resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class LDMKLAutoencoder(nn.Module):
    """LDM-layout KL autoencoder: ``encoder.down.*``, ``decoder.up.*``, ``quant_conv``, ``post_quant_conv``."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        decoder_attn_resolutions: tuple[int, ...] = (),
        resolution: int = 256,
        z_channels: int = 16,
        groups: int = 32,
    ):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        sides = [resolution // 2**i for i in range(len(ch_mult))]  # feature side of each level

        self.encoder = nn.Module()
        self.encoder.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.encoder.down = nn.ModuleList()
        c_in = ch
        for i, (width, side) in enumerate(zip(widths, sides)):
            level = Level(c_in, width, num_res_blocks, attention=side in attn_resolutions, groups=groups)
            if i < len(widths) - 1:
                level.downsample = Resample(width, up=False)
            self.encoder.down.append(level)
            c_in = width
        self.encoder.mid = Mid(widths[-1], groups)
        self.encoder.norm_out = _norm(widths[-1], groups)
        self.encoder.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)  # mean and logvar

        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.decoder.mid = Mid(widths[-1], groups)
        # Stored by level (index 0 = highest resolution) although it runs from the last level down.
        levels = [None] * len(widths)
        c_in = widths[-1]
        for i in reversed(range(len(widths))):
            level = Level(
                c_in, widths[i], num_res_blocks + 1, attention=sides[i] in decoder_attn_resolutions, groups=groups
            )
            if i > 0:
                level.upsample = Resample(widths[i], up=True)
            levels[i] = level
            c_in = widths[i]
        self.decoder.up = nn.ModuleList(levels)
        self.decoder.norm_out = _norm(widths[0], groups)
        self.decoder.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> posterior (mean, logvar), each (B, z, H/f, W/f); logvar clamped to [-30, 20]."""
        enc = self.encoder
        h = enc.conv_in(x)
        for level in enc.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = enc.conv_out(F.silu(enc.norm_out(enc.mid(h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, h, w) unscaled latent -> (B, 3, h*f, w*f) image."""
        dec = self.decoder
        h = dec.mid(dec.conv_in(self.post_quant_conv(z)))
        for level in reversed(dec.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return dec.conv_out(F.silu(dec.norm_out(h)))


@torch.no_grad()
def randomize_(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Give every parameter random values (norm gains near 1), so a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if ".norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        elif p.ndim == 4:
            p.copy_(noise / math.sqrt(p[0].numel()))  # fan-in scaling keeps activations O(1)
        else:
            p.copy_(0.1 * noise)
    return model
