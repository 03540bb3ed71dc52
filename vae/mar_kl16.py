"""Import of MAR's KL-16 autoencoder (``kl16.ckpt``, LDM key layout) into a diffusers ``AutoencoderKL``.

The LDM/MAR KL autoencoder maps exactly onto diffusers' ``AutoencoderKL``, parameter for parameter and
operation for operation, so no model of our own is needed:

- resnet blocks: GroupNorm(eps 1e-6) -> SiLU -> 3x3 conv, twice, plus a 1x1 ``nin_shortcut`` when the
  width changes; diffusers' ``ResnetBlock2D`` without a time embedding is the same, its 1x1
  shortcut is called ``conv_shortcut``.
- attention blocks: one head over all channels, scores scaled by ``C ** -0.5``, 1x1 convs for
  q/k/v/proj_out and a residual; diffusers' deprecated-style ``Attention`` (head dim = channels) is
  the same with Linear layers, so the 1x1 conv weights lose their two trailing unit dims.
- the encoder has attention after each resnet block of the level whose feature side is 16 (the last
  of five levels at 256px; LDM decides by the configured resolution, not the input), which is
  diffusers' ``AttnDownEncoderBlock2D``; the decoder has none in its up levels.
- downsampling pads (0, 1, 0, 1) and runs a stride-2 3x3 conv without padding, which is diffusers'
  ``Downsample2D`` with ``padding=0``; upsampling is nearest x2 then a 3x3 conv in both.
- LDM lists the decoder's ``up`` levels from the highest resolution (index 0) although it runs them
  from the lowest; diffusers stores ``up_blocks`` in running order, so ``up.{i}`` -> ``up_blocks.{n-1-i}``.
- the posterior clamps the log-variance to [-30, 20] in both.

The mapping needs ``ch_mult[0] == 1`` (LDM's ``conv_in`` always outputs ``ch`` channels, diffusers'
outputs the first level's width) and ``embed_dim == z_channels`` (diffusers ties them); MAR's
KL-16 satisfies both. Tests check the equivalence against an independent LDM-layout model.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .diffusers_vae import DiffusersVAE

MAR_KL16_SCALING = 0.2325  # MAR and FlowAR multiply posterior samples by this before training
TRAINING_ONLY_PREFIXES = ("loss.",)  # LPIPS and discriminator weights of LDM training checkpoints


@dataclass(frozen=True)
class KLArch:
    """Architecture numbers of an LDM-style KL autoencoder; the defaults are MAR's KL-16."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    attn_resolutions: tuple[int, ...] = (16,)  # encoder levels (by feature side) with attention
    decoder_attn_resolutions: tuple[int, ...] = ()  # MAR's decoder has none
    resolution: int = 256  # side the level resolutions are counted from
    z_channels: int = 16
    norm_num_groups: int = 32
    in_channels: int = 3
    out_ch: int = 3

    def __post_init__(self):
        for name in ("ch_mult", "attn_resolutions", "decoder_attn_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.ch_mult or self.ch_mult[0] != 1:
            raise ValueError(f"ch_mult must start with 1 for the diffusers mapping, got {self.ch_mult}")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_num_groups for w in widths):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every level width {widths}")

    def level_side(self, level: int) -> int:
        """Feature side of encoder/decoder level ``level`` for an input of side ``resolution``."""
        return self.resolution // 2**level


def mar_kl16_config(*, arch: KLArch = KLArch(), scaling_factor: float = MAR_KL16_SCALING) -> dict:
    """Keyword arguments of the diffusers ``AutoencoderKL`` equal to the LDM model described by ``arch``."""
    levels = range(len(arch.ch_mult))
    down = tuple(
        "AttnDownEncoderBlock2D" if arch.level_side(i) in arch.attn_resolutions else "DownEncoderBlock2D"
        for i in levels
    )
    # Diffusers lists the decoder levels in running order: lowest resolution first.
    up = tuple(
        "AttnUpDecoderBlock2D" if arch.level_side(i) in arch.decoder_attn_resolutions else "UpDecoderBlock2D"
        for i in reversed(levels)
    )
    return dict(
        in_channels=arch.in_channels,
        out_channels=arch.out_ch,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(arch.ch * m for m in arch.ch_mult),
        layers_per_block=arch.num_res_blocks,
        act_fn="silu",
        latent_channels=arch.z_channels,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.resolution,
        scaling_factor=scaling_factor,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    )


_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ENDS = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}

_LEVEL_KEY = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$")
_RESAMPLE_KEY = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$")
_MID_KEY = re.compile(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(\w+)\.(weight|bias)$")
_END_KEY = re.compile(r"^(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)$")
_QUANT_KEY = re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$")


def _diffusers_name(key: str, num_levels: int) -> str | None:
    """Diffusers name of one LDM parameter name, or None when the name is not part of the layout."""
    if m := _LEVEL_KEY.match(key):
        part, level, kind, index, layer, leaf = m.groups()
        table = _RESNET if kind == "block" else _ATTN
        if layer not in table:
            return None
        if part == "encoder.down":
            prefix = f"encoder.down_blocks.{level}"
        else:
            prefix = f"decoder.up_blocks.{num_levels - 1 - int(level)}"
        group = "resnets" if kind == "block" else "attentions"
        return f"{prefix}.{group}.{index}.{table[layer]}.{leaf}"
    if m := _RESAMPLE_KEY.match(key):
        part, level, kind, leaf = m.groups()
        if part == "encoder.down" and kind == "downsample":
            return f"encoder.down_blocks.{level}.downsamplers.0.conv.{leaf}"
        if part == "decoder.up" and kind == "upsample":
            return f"decoder.up_blocks.{num_levels - 1 - int(level)}.upsamplers.0.conv.{leaf}"
        return None
    if m := _MID_KEY.match(key):
        part, name, layer, leaf = m.groups()
        table = _ATTN if name == "attn_1" else _RESNET
        if layer not in table:
            return None
        return f"{part}.mid_block.{_MID[name]}.{table[layer]}.{leaf}"
    if m := _END_KEY.match(key):
        part, name, leaf = m.groups()
        return f"{part}.{_ENDS[name]}.{leaf}"
    if _QUANT_KEY.match(key):
        return key
    return None


def _expected_shapes(arch: KLArch) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the diffusers model for ``arch``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoencoderKL(**mar_kl16_config(arch=arch))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _preview(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def convert_mar_kl16_state_dict(
    ldm_sd: dict[str, torch.Tensor], *, arch: KLArch = KLArch()
) -> dict[str, torch.Tensor]:
    """Rename (and reshape) an LDM-layout KL state dict into diffusers ``AutoencoderKL`` keys.

    Strict: any key outside the layout of ``arch`` (other than training-only ``loss.*`` weights,
    which are dropped), any shape mismatch and any missing parameter raises a ValueError that lists
    them. Tensors are not copied.
    """
    expected = _expected_shapes(arch)
    num_levels = len(arch.ch_mult)
    out: dict[str, torch.Tensor] = {}
    unknown, bad_shapes = [], []
    for key, value in ldm_sd.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        name = _diffusers_name(key, num_levels)
        if name is None or name not in expected or name in out:
            unknown.append(key)
            continue
        want = expected[name]
        if not isinstance(value, torch.Tensor):
            bad_shapes.append(f"{key}: not a tensor ({type(value).__name__})")
            continue
        if len(want) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            # 1x1 conv (out, in, 1, 1) -> Linear (out, in): the same map on each pixel.
            value = value.reshape(value.shape[0], value.shape[1])
        if tuple(value.shape) != want:
            bad_shapes.append(f"{key}: {tuple(value.shape)} but {name} needs {want}")
            continue
        out[name] = value
    missing = sorted(set(expected) - set(out))
    problems = []
    if unknown:
        problems.append(f"unknown keys for {arch}: {_preview(sorted(unknown))}")
    if bad_shapes:
        problems.append(f"shape mismatches: {_preview(bad_shapes)}")
    if missing:
        problems.append(f"no source for diffusers parameters: {_preview(missing)}")
    if problems:
        raise ValueError("ldm_sd does not match the LDM KL layout; " + "; ".join(problems))
    return out


def _read_state_dict(path: str | os.PathLike, map_location) -> dict[str, torch.Tensor]:
    """The LDM state dict inside a checkpoint: ``{"model": sd}`` (MAR), ``{"state_dict": sd}`` or bare."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file; expected MAR's kl16.ckpt")
    try:
        # weights_only: a checkpoint is data, never code to run on load.
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"path {str(path)!r} holds Python objects besides tensors and plain containers, which we do "
            "not unpickle; re-save its state dict alone with torch.save({'model': sd}, ...)"
        ) from err
    if isinstance(ckpt, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(ckpt.get(wrapper), dict):
                return ckpt[wrapper]
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise ValueError(f"path {str(path)!r} holds neither {{'model': state_dict}} nor a bare state dict")


def load_mar_kl16(
    path: str | os.PathLike,
    *,
    arch: KLArch = KLArch(),
    scaling_factor: float = MAR_KL16_SCALING,
    sample_posterior: bool = True,
    map_location: str | torch.device = "cpu",
) -> DiffusersVAE:
    """MAR's ``kl16.ckpt`` (or any LDM-layout KL checkpoint matching ``arch``) as a ``DiffusersVAE``."""
    diffusers_sd = convert_mar_kl16_state_dict(_read_state_dict(path, map_location), arch=arch)
    with torch.device("meta"):
        autoencoder = AutoencoderKL(**mar_kl16_config(arch=arch, scaling_factor=scaling_factor))
    # assign: take the loaded tensors as the parameters instead of allocating and copying ~66M floats.
    autoencoder.load_state_dict(diffusers_sd, strict=True, assign=True)
    autoencoder.eval()
    return DiffusersVAE(autoencoder, sample_posterior=sample_posterior)


def convert_mar_kl16(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: KLArch = KLArch(),
    scaling_factor: float = MAR_KL16_SCALING,
) -> Path:
    """Write ``path`` (kl16.ckpt) as a diffusers folder (config.json + safetensors) at ``out_dir``."""
    vae = load_mar_kl16(path, arch=arch, scaling_factor=scaling_factor)
    out_dir = Path(out_dir).expanduser()
    vae.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vae.mar_kl16", description="Convert MAR's kl16.ckpt into a diffusers AutoencoderKL folder."
    )
    parser.add_argument("ckpt", help="MAR's kl16.ckpt ({'model': state_dict} in the LDM layout)")
    parser.add_argument("out_dir", help="folder to write config.json and the safetensors weights into")
    args = parser.parse_args(argv)
    out_dir = convert_mar_kl16(args.ckpt, args.out_dir)
    print(f"wrote {out_dir} (load with DiffusersVAE.from_pretrained({str(out_dir)!r}))")


if __name__ == "__main__":
    main()
