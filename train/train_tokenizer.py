"""Train VAR's multi-scale residual VQ tokenizer (``vae.msvq.MultiScaleVQVAE``); the authors never released this.

    python -m train.train_tokenizer --out runs/mnist-msvq --threads 1           # bundled MNIST, a few CPU minutes
    python -m train.train_tokenizer --config tok.yaml out_dir=runs/tok data=path/to/images preset=vae_ch160v4096z32 \\
        image_size=256 batch_size=16 steps=200000 gan_weight=0.1 gan_start=20000 tensorboard=true

Options are the fields of ``train.tokenizer_config.TokenizerConfig``, read like ``train.config.TrainConfig``: a YAML
file (``--config``, a run's ``train_config.json`` too), then ``key=value`` overrides (``model.KEY=VALUE`` for the
tokenizer's own fields, ``betas=0.5,0.9`` for a pair); ``--out`` and ``--threads`` are shortcuts for ``out_dir=``
and ``threads=``.

Losses, every step (``vae.msvq.MultiScaleVQVAE.forward``):

- reconstruction: L2 by default (``recon=l1`` for L1). Without a perceptual loss (no LPIPS weights offline), the
  squared error is the loss whose optimum is the PSNR we report, and its gradient grows with the error, so the
  gross errors of early training dominate. VQGAN's L1 earns its sharper edges together with LPIPS and a GAN;
  with ``gan_weight`` on, ``recon=l1`` is the VQGAN recipe minus LPIPS.
- ``beta * commitment + codebook``, VAR's quantizer losses: the mean over scales of ``mse(f_hat_k, f)`` with the
  gradient to the encoder (commitment, weighted by the config's beta: VAR's 0.25, the MNIST preset's 0.05) and to
  the codes and phi convs (codebook), ``f_hat_k`` the running sum after scale k; the decoder sees f_hat through a
  straight-through estimator.
- optional (off by default): a patch-GAN discriminator with hinge losses (``train.gan``), from ``gan_start`` on,
  the generator term weighted by ``gan_weight``.

Dead codes (``train.dead_codes``; on by default, ``dead_after=0`` turns it off): every step, codes that no scale
picked in the last ``dead_after`` steps, and the codes a collapsed coarse scale needs to reach the per-scale floor
``min_scale_use``, are re-initialised from vectors quantised in the current batch, the scale drawn first so that
the coarse scales, where collapse happens, get codes. The progress bar shows the number of resets and the codes
used per scale in the batch; TensorBoard logs both.

Reported at the end (and every ``eval_every`` steps): reconstruction PSNR on the held-out images (the 500
held-out MNIST digits) and the codebook use per scale. **Codebook use at scale k** = the number of distinct codes
that are the nearest code of at least one held-out token at scale k (all ``N * s_k * s_k`` of them), divided by
the codebook size V. At scale 1 the 500 held-out digits give 500 tokens, so with the MNIST preset's V = 64 a use
of 50% means that 32 different codes start the digits.

The result is a ``save_pretrained`` folder (config.json + model.safetensors) plus ``metrics.json`` and
``train_config.json`` (the run's TokenizerConfig, written before training starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vae.msvq import MultiScaleVQVAE

from .data import build_dataset
from .dead_codes import DeadCodeTracker, reinit_codes, revive_codes
from .gan import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from .tokenizer_config import TokenizerConfig, load_tokenizer_config


# ------------------------------------------------------------------------------------------- evaluation
def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def evaluate(model: MultiScaleVQVAE, images: torch.Tensor, *, batch_size: int = 100) -> dict:
    """Mean held-out PSNR (dB), codebook use per scale (fraction of the V codes picked at least once at that scale,
    see the module docstring) and the hit counts (K, V)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(model.scales), model.codebook_size, dtype=torch.long)
    psnrs = []
    device = model.quantize.embedding.weight.device
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        indices, f_hat = model.encode_to_indices_and_f_hat(chunk)
        psnrs.append(psnr_per_image(model.decode_f_hat(f_hat), chunk))
        for k, idx in enumerate(indices):
            counts[k] += idx.flatten().bincount(minlength=model.codebook_size).cpu()
    model.train(was_training)
    usage = ((counts > 0).sum(1).float() / model.codebook_size).tolist()
    return {"psnr": float(torch.cat(psnrs).mean()), "usage": usage, "counts": counts}


# ------------------------------------------------------------------------------------------- data
def _stack(dataset, limit: int | None = None) -> torch.Tensor:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


class _Batches:
    """Training batches: in memory for MNIST (drawn with ``generator``), a shuffling DataLoader for a folder."""

    def __init__(self, data: str, image_size: int, batch_size: int, *, seed: int, num_workers: int):
        self.batch_size = batch_size
        dataset = build_dataset(data, image_size=image_size, split="train", unconditional=True, seed=seed)
        self.in_memory = isinstance(data, str) and data.lower() == "mnist"
        if self.in_memory:
            self.images = _stack(dataset)  # 4,500 small digits
            self.generator = torch.Generator().manual_seed(seed)
        else:
            print(dataset.verify(num_threads=max(1, num_workers)).splitlines()[0])
            if len(dataset) < batch_size:
                raise ValueError(f"data {data!r} has {len(dataset)} readable images, fewer than batch_size "
                                 f"{batch_size}")
            self.dataset = dataset
            self.loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
            self.epoch, self.iterator = 0, iter(self.loader)

    def next(self) -> torch.Tensor:
        if self.in_memory:
            return self.images[torch.randint(len(self.images), (self.batch_size,), generator=self.generator)]
        try:
            return next(self.iterator)[0]
        except StopIteration:
            self.epoch += 1
            self.dataset.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            return next(self.iterator)[0]


def heldout_images(data: str, image_size: int, eval_data: str | None, eval_images: int) -> tuple[torch.Tensor, str]:
    """The evaluation images and a description: MNIST's held-out split, ``eval_data``, or (for a folder without
    ``eval_data``) center crops of the first training images, which are then not held out."""
    if isinstance(data, str) and data.lower() == "mnist" and eval_data is None:
        images = _stack(build_dataset("mnist", image_size=image_size, split="heldout"), eval_images)
        return images, f"{len(images)} held-out MNIST digits"
    source = eval_data or data
    dataset = build_dataset(source, image_size=image_size, split="heldout", unconditional=True)
    images = _stack(dataset, eval_images)
    note = "" if eval_data else " (training images, center-cropped: NOT held out; set eval_data)"
    return images, f"{len(images)} images of {source}{note}"



# ------------------------------------------------------------------------------------------- training
def _param_groups(model: MultiScaleVQVAE, weight_decay: float, codebook_lr_scale: float) -> list[dict]:
    """Decay on conv weights only: never on the codebook (it would pull codes to 0), norms or biases. The codebook
    has its own learning-rate multiplier ``lr_scale``."""
    codebook = model.quantize.embedding.weight
    decay = [p for p in model.parameters() if p.ndim == 4]
    rest = [p for p in model.parameters() if p.ndim != 4 and p is not codebook]
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": [codebook], "weight_decay": 0.0, "lr_scale": codebook_lr_scale}]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _as_config(config: TokenizerConfig | str | os.PathLike, options: dict) -> TokenizerConfig:
    """``config`` with the field values in ``options``; a path stands for ``TokenizerConfig(out_dir=path)``."""
    if isinstance(config, (str, os.PathLike)):
        config, options = TokenizerConfig, {"out_dir": config, **options}
    elif not isinstance(config, TokenizerConfig):
        raise ValueError(f"config must be a TokenizerConfig or an output folder, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(TokenizerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
    if "out_dir" in options:
        options["out_dir"] = os.fspath(options["out_dir"])
    return config(**options) if config is TokenizerConfig else dataclasses.replace(config, **options)


def train_tokenizer(config: TokenizerConfig | str | os.PathLike, **options) -> dict:
    """Train a tokenizer as ``config`` says, evaluate it, save it with ``save_pretrained`` into ``config.out_dir``;
    returns the metrics (held-out ``psnr``, ``usage`` per scale, ``scales``, ``codes_reset``, ``seconds``, ...).

    ``options`` are TokenizerConfig fields that replace the config's; an output folder in place of the config is
    short for ``TokenizerConfig(out_dir=folder, **options)``: ``train_tokenizer("runs/tok", steps=100)``.
    """
    cfg = _as_config(config, options)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    vq_config = cfg.msvq_config()
    side = vq_config.scales[-1] * vq_config.downsample
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir).expanduser()
    batches = _Batches(cfg.data, side, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers)
    eval_set, eval_name = heldout_images(cfg.data, side, cfg.eval_data or None, cfg.eval_images)
    # Written before training so that an interrupted run still records its settings.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    model = MultiScaleVQVAE(vq_config).to(device)
    reset_generator = torch.Generator().manual_seed(cfg.seed + 1)
    # Codes start on vectors of a first batch, an equal share from each scale (torch's N(0, 1) codes are far from
    # the features, and drawn from all vectors alike nearly every code would sit among the finest scale's).
    with torch.no_grad():
        f = model.encode_features(batches.next().to(device))
        model.quantize.embedding.weight.normal_(0, float(f.std()))
        residuals = model.quantize(f)["residuals"]
        owner = torch.arange(vq_config.codebook_size) % len(vq_config.scales)
        for k, vectors in enumerate(residuals):
            reinit_codes(model, torch.nonzero(owner == k).flatten(), vectors, generator=reset_generator)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.codebook_lr_scale), lr=cfg.lr,
                                  betas=cfg.betas)
    disc = d_optimizer = None
    if cfg.gan_weight > 0:
        # 3 layers at 64 px and up (70x70 patches at 256 px), fewer for small images so the logits map is not empty.
        layers = max(1, min(3, side.bit_length() - 4))
        disc = PatchDiscriminator(vq_config.image_channels, num_layers=layers).to(device)
        d_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.discriminator_lr, betas=cfg.gan_betas,
                                        weight_decay=0.0)
    tracker = (DeadCodeTracker(len(vq_config.scales), vq_config.codebook_size, cfg.dead_after,
                               min_scale_use=cfg.min_scale_use) if cfg.dead_after else None)
    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    print(f"training tokenizer {cfg.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"V {vq_config.codebook_size}, scales {vq_config.scales}) on {cfg.data} at {side}px, "
          f"batch {cfg.batch_size}, {cfg.steps} steps; evaluating on {eval_name}")

    start = time.perf_counter()
    codes_reset, history = 0, []
    bar = tqdm(range(cfg.steps), desc="tokenizer", disable=not cfg.progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        lr_now = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group["lr_scale"]
        images = batches.next().to(device)
        out = model(images, recon=cfg.recon)
        loss = out.loss
        gan_on = disc is not None and step >= cfg.gan_start
        g_loss = torch.zeros((), device=device)
        if gan_on:
            disc.requires_grad_(False)
            g_loss = hinge_g_loss(disc(out.reconstruction))
            loss = loss + cfg.gan_weight * g_loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"tokenizer loss is {loss.item()} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        d_loss = torch.zeros((), device=device)
        if gan_on:
            disc.requires_grad_(True)
            d_loss = hinge_d_loss(disc(images), disc(out.reconstruction.detach()))
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
        reset = 0
        if tracker is not None:
            tracker.update(out.code_counts)
            reset = sum(revive_codes(model, tracker, out.residuals, generator=reset_generator, optimizer=optimizer))
            codes_reset += reset
        batch_use = (out.code_counts > 0).sum(1).tolist()
        bar.set_postfix(recon=f"{out.recon_loss.item():.4f}", vq=f"{out.vq_loss.item():.4f}", reset=codes_reset,
                        codes="/".join(map(str, batch_use)))
        done = step + 1
        if writer is not None:
            for name, value in (("recon", out.recon_loss), ("commitment", out.commitment_loss),
                                ("codebook", out.codebook_loss), ("gan_g", g_loss), ("gan_d", d_loss)):
                writer.add_scalar(f"loss/{name}", float(value.detach()), done)
            writer.add_scalar("codes/reset", reset, done)
            for scale, used in zip(vq_config.scales, batch_use):
                writer.add_scalar(f"codes/batch_use_scale_{scale}", used, done)
            writer.add_scalar("lr", lr_now, done)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            result = evaluate(model, eval_set)
            history.append({"step": done, "psnr": result["psnr"], "usage": result["usage"]})
            tqdm.write(f"step {done}: held-out PSNR {result['psnr']:.2f} dB, use per scale "
                       + " ".join(f"{s}:{u:.0%}" for s, u in zip(vq_config.scales, result["usage"])))
            if writer is not None:
                _log_eval(writer, result, vq_config.scales, done)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    result = evaluate(model, eval_set)
    if writer is not None:
        _log_eval(writer, result, vq_config.scales, cfg.steps)
        writer.close()
    model.save_pretrained(out_dir)
    metrics = {
        "psnr": result["psnr"], "usage": result["usage"], "scales": list(vq_config.scales), "eval": eval_name,
        "codes_reset": codes_reset, "seconds": seconds, "steps": cfg.steps, "preset": cfg.preset,
        "config": vq_config.to_dict(), "history": history,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _log_eval(writer, result: dict, scales, step: int) -> None:
    writer.add_scalar("eval/psnr", result["psnr"], step)
    for side, use in zip(scales, result["usage"]):
        writer.add_scalar(f"eval/code_use_scale_{side}", use, step)


def main(argv=None) -> int:
    keys = ", ".join(f.name for f in dataclasses.fields(TokenizerConfig))
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:3]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.fill("config keys: " + keys, width=100))
    p.add_argument("--config", help="YAML (or JSON, e.g. a run's train_config.json) file of TokenizerConfig keys")
    p.add_argument("--out", help="output folder: short for out_dir=OUT (wins over the file and the overrides)")
    p.add_argument("--threads", type=int, help="torch CPU threads: short for threads=N (wins likewise)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (model.KEY=VALUE for the tokenizer's fields)")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        # The trainer's options used to be --flags; say what replaced them.
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        p.error(f"unrecognised argument {flag!r}; training options are config keys: "
                f"{flag.lstrip('-').split('=')[0].replace('-', '_')}=VALUE")
    try:
        cfg = load_tokenizer_config(args.config, args.overrides)
        shortcuts = {k: v for k, v in (("out_dir", args.out), ("threads", args.threads)) if v is not None}
        if shortcuts:
            cfg = dataclasses.replace(cfg, **shortcuts)
        result = train_tokenizer(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"train_tokenizer: {err}", file=sys.stderr)
        return 2
    print(f"reconstruction PSNR {result['psnr']:.2f} dB on {result['eval']}; codebook use per scale "
          + ", ".join(f"{s}x{s}: {u:.1%}" for s, u in zip(result["scales"], result["usage"]))
          + f"; {result['codes_reset']} dead codes re-initialised; {result['seconds']:.0f} s of training; "
          f"saved to {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
