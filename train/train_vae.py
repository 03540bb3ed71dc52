"""Train a small diffusers AutoencoderKL on the bundled MNIST digits, on the CPU, in a few minutes.

    python -m train.train_vae --out runs/mnist-vae --steps 1500

The result is a plain diffusers folder (``AutoencoderKL.from_pretrained`` loads it) whose config
carries a scaling factor estimated from the training digits. Real users load SD-VAE, MAR KL-16 and the
like instead; this VAE exists so the whole FlowAR path runs on a laptop with bundled data.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from flowar.outputs import autocast_context
from vae import DiffusersVAE

from .data import build_dataset


# The encoder's channels at 32x32, 16x16 and 8x8 (the decoder's, reversed); GroupNorm takes 16 groups, so each
# is a multiple of 16. Most of a step is the convolutions at 32x32 and 16x16 (the decoder upsamples at the
# channels of the level below): on a 2-core AVX2 CPU a step of batch 64 takes 0.96 s with (32, 64, 64), 0.59 s
# with (32, 32, 64) and 0.41 s with (16, 32, 64).
VAE_CHANNELS = (32, 64, 64)
NORM_GROUPS = 16


def small_autoencoder(latent_channels: int = 4, channels=VAE_CHANNELS) -> AutoencoderKL:
    """Three levels (downsample 4): 32x32 digits -> 8x8 latents; ``channels`` per level (see VAE_CHANNELS)."""
    check_channels(channels)
    return AutoencoderKL(
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=NORM_GROUPS,
        latent_channels=latent_channels,
        sample_size=32,
    )


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def stack(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)][0] for i in indices])


@torch.no_grad()
def evaluate_psnr(vae: DiffusersVAE, images: torch.Tensor, batch: int = 128) -> float:
    vae.sample_posterior = False
    out = [vae.decode(vae.encode(chunk)) for chunk in images.split(batch)]
    vae.sample_posterior = True
    return psnr(torch.cat(out), images)


# How the latents are scaled for the generator: "global", LDM's one factor for unit std over all elements, or
# "per-channel", each channel centred and given unit std (diffusers' latents_mean / latents_std).
LATENT_NORMS = ("global", "per-channel")
# The KL term's weight against the per-pixel reconstruction loss, the one default (the demo trains with it).
# LDM's large VAEs use 1e-6, where the term is about 2e-5 of the loss and the posteriors collapse to near-points
# (std ~0.05 against a latent std of 3.3); 1e-3 gives the generators wider posteriors to learn from, at the
# same PSNR and time (docs/ablations.md#kl-weight).
KL_WEIGHT = 1e-3
# How many training digits the latent statistics are estimated from.
STATS_IMAGES = 1000


def train_vae(out_dir, *, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, kl_weight: float = KL_WEIGHT,
              latent_norm: str = LATENT_NORMS[0], channels=VAE_CHANNELS, image_size: int = 32, seed: int = 0,
              bf16: bool = False, progress: bool = True) -> dict:
    """Train, estimate the latent scaling, save; returns {"psnr": held-out dB, "scaling_factor": ...}.

    kl_weight: the KL term's weight against the per-pixel reconstruction loss; a larger one gives wider
    posteriors, which the decoder learns to decode. latent_norm: one of LATENT_NORMS. channels: the encoder's
    channels per level (VAE_CHANNELS). bf16: the
    encoder and decoder run under bf16 autocast (the convolutions, 3/4 of a step's time, about 1.5x faster on
    a CPU with AVX-512 bf16); the weights, the posterior's sample and the losses stay float32, and the saved
    VAE is float32 like any other."""
    check_latent_norm(latent_norm)
    check_kl_weight(kl_weight)
    check_channels(channels)
    torch.manual_seed(seed)
    train_set = build_dataset("mnist", image_size=image_size, split="train")
    train_images = stack(train_set, range(len(train_set)))  # 4,500 small digits fit in memory
    autoencoder = small_autoencoder(channels=channels)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    cpu, autocast_dtype = torch.device("cpu"), torch.bfloat16 if bf16 else None
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:  # cosine decay keeps the end of a short run stable
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = train_images[torch.randint(len(train_images), (batch_size,), generator=generator)]
        with autocast_context(cpu, autocast_dtype):
            moments = autoencoder.encode(batch).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments.float())
        latents = posterior.sample(generator=generator)
        with autocast_context(cpu, autocast_dtype):
            reconstruction = autoencoder.decode(latents).sample.float()
        recon = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / batch[0].numel()
        loss = recon + kl_weight * kl
        if not torch.isfinite(loss):
            raise RuntimeError(f"VAE loss is {loss.item()} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(recon=f"{recon.item():.4f}")
    autoencoder.eval()
    result = normalize_and_save(DiffusersVAE(autoencoder), train_images[:STATS_IMAGES], out_dir,
                                latent_norm=latent_norm, seed=seed, image_size=image_size)
    return {**result, "seconds": time.perf_counter() - start}


def check_latent_norm(latent_norm: str) -> None:
    if latent_norm not in LATENT_NORMS:
        raise ValueError(f"latent_norm must be one of {LATENT_NORMS}, got {latent_norm!r}")


def check_kl_weight(kl_weight: float, name: str = "kl_weight") -> None:
    """``name``: how the caller's user spells the argument (train.demo's ``--kl-weight``)."""
    if not kl_weight >= 0 or kl_weight == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {kl_weight}")


def check_channels(channels, name: str = "channels") -> None:
    """Three levels, each a positive multiple of NORM_GROUPS."""
    values = list(channels) if isinstance(channels, (list, tuple)) else None
    if values is None or len(values) != len(VAE_CHANNELS) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 and c % NORM_GROUPS == 0 for c in values):
        raise ValueError(f"{name} must be {len(VAE_CHANNELS)} positive multiples of {NORM_GROUPS} (one per level, "
                         f"e.g. {','.join(map(str, VAE_CHANNELS))}), got {channels!r}")


def parse_channels(text: str, name: str) -> list[int]:
    """``16,32,64`` as a checked list of ints; a ValueError names ``name``."""
    try:
        channels = [int(part) for part in text.split(",")]
    except ValueError:
        channels = text
    check_channels(channels, name=name)
    return channels


@torch.no_grad()
def normalize_latents(vae: DiffusersVAE, images: torch.Tensor, latent_norm: str, *, seed: int) -> None:
    """Set ``vae``'s latent scaling by ``latent_norm`` from posterior samples of ``images`` (drawn with ``seed``)."""
    check_latent_norm(latent_norm)
    generator = torch.Generator().manual_seed(seed)
    if latent_norm == "per-channel":
        mean, std = vae.estimate_channel_stats(images, generator=generator)
        vae.set_scaling(1.0, latents_mean=mean, latents_std=std)
    else:
        vae.set_scaling(*vae.estimate_scaling(images, generator=generator))


def renormalize_vae(vae_dir, out_dir, *, latent_norm: str, seed: int = 0, image_size: int = 32) -> dict:
    """A VAE that ``train_vae`` saved, its latent scaling estimated again by ``latent_norm`` and saved to
    ``out_dir``: the weights are the same, so this is what ``train_vae`` with that ``latent_norm`` and the run's
    seed saves, without training again. Returns {"psnr": held-out dB, "scaling_factor": ...} like train_vae."""
    check_latent_norm(latent_norm)
    train_set = build_dataset("mnist", image_size=image_size, split="train")
    vae = DiffusersVAE.from_pretrained(vae_dir)
    vae.autoencoder.eval()
    return normalize_and_save(vae, stack(train_set, range(STATS_IMAGES)), out_dir, latent_norm=latent_norm,
                              seed=seed, image_size=image_size)


def normalize_and_save(vae: DiffusersVAE, stats_images: torch.Tensor, out_dir, *, latent_norm: str, seed: int,
                       image_size: int) -> dict:
    """The last step of train_vae and renormalize_vae: the latent scaling from ``stats_images``, the held-out
    PSNR, the diffusers folder; returns {"psnr": ..., "scaling_factor": ...}."""
    normalize_latents(vae, stats_images, latent_norm, seed=seed)
    held_out = build_dataset("mnist", image_size=image_size, split="heldout")
    held_out_psnr = evaluate_psnr(vae, stack(held_out, range(len(held_out))))
    vae.save_pretrained(out_dir)
    return {"psnr": held_out_psnr, "scaling_factor": vae.scaling_factor}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output diffusers folder")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=KL_WEIGHT,
                   help="KL weight against the per-pixel reconstruction loss")
    p.add_argument("--latent-norm", choices=LATENT_NORMS, default=LATENT_NORMS[0],
                   help="one scaling factor for all latents, or a mean and std per channel")
    p.add_argument("--channels", default=",".join(map(str, VAE_CHANNELS)),
                   help="the encoder's channels at 32x32, 16x16 and 8x8, multiples of 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="encoder and decoder under bf16 autocast (float32 weights)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    try:
        channels = parse_channels(args.channels, name="--channels")
        result = train_vae(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           kl_weight=args.kl_weight, latent_norm=args.latent_norm, channels=channels, bf16=args.bf16)
    except (ValueError, RuntimeError) as err:
        print(f"train_vae: {err}", file=sys.stderr)
        return 2
    print(f"MNIST VAE: held-out reconstruction PSNR {result['psnr']:.2f} dB, scaling factor "
          f"{result['scaling_factor']:.4f}, {result['seconds']:.0f} s; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
