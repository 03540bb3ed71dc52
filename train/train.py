"""Train a FlowAR model, or the VAR baseline. One file, top to bottom: setup, data, model, optimiser,
resume, loop. ``preset=flowar-*`` trains FlowAR on VAE latents; ``preset=var-*`` trains VAR on the token
maps of its multi-scale VQ tokenizer (``tokenizer=...`` or a token cache), with the same loop.

    python -m train.train --config cfg.yaml key=value ...              # one process
    torchrun --nproc_per_node=2 -m train.train --config cfg.yaml ...   # DDP (gloo on CPU, nccl on GPU)
    python -m train.train --config cfg.yaml --resume                   # continue out_dir's last checkpoint

Reproducibility: every random draw of a step (which samples, posterior noise, flips, label drop, flow
times and noise) comes from a generator seeded by (seed, step) for the whole global batch, and each
process takes its rows. A run therefore gives the same weights however it is split over processes and
accumulation steps, and a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from eval.fid import compute_metrics
from eval.inception import load_feature_network
from eval.metrics import feature_statistics
from eval.reference import default_cache_dir, write_stats_npz
from flowar import (FLEXVAR_PRESETS, VAR, VAR_PRESETS, XAR, XAR_PRESETS, FlexVAR, FlowAR, get_flexvar_preset,
                    get_preset, get_var_preset, get_xar_preset)
from flowar.outputs import autocast_context, image_grid, to_uint8_images
from flowar.sampling import generate

from .checkpoint import CheckpointManager
from .config import TrainConfig, load_config
from .data import ImageFolderDataset, MNISTDataset
from .latents import CACHE_INDEX, LatentSource, build_latent_source


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN or infinite; the last good checkpoint is left untouched."""


# ---------------------------------------------------------------------------------------------- setup
def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group when started by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """FlowAR's AdamW groups: no weight decay on biases and 1-D parameters (norm gains)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: torch.nn.Module, *, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused (one kernel over all tensors) where torch has the fused kernel for the
    parameters' device (CPU and CUDA). The update is AdamW's; only the kernel count changes: on FlowAR-S the
    per-tensor loop was hundreds of small kernels per step."""
    groups = param_groups(model, weight_decay)
    device = next(model.parameters()).device.type
    fused = device in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak, then half-cosine down to min_lr at total_steps."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay(decay: float, updates: int, *, bias_correction: bool) -> float:
    """The decay of the ``updates``-th EMA update (1 for the first).

    Without bias correction the EMA starts as a copy of the initial weights and decays at ``decay`` from the
    first step (the authors' recipe); after n steps decay**n of it is still the random init: 13% after 400
    steps at 0.995, 37% after 10,000 at 0.9999. With it, the EMA is the exponential average of the trained
    weights alone, sum_i (1 - decay) decay**(n - i) theta_i / (1 - decay**n): the first update copies the
    weights, and long runs converge to the plain EMA."""
    if not bias_correction:
        return decay
    return decay * (1 - decay ** (updates - 1)) / (1 - decay ** updates)


@torch.no_grad()
def update_ema(ema: dict, model: torch.nn.Module, decay: float) -> None:
    """ema[name] <- decay * ema[name] + (1 - decay) * param, for every parameter, in one foreach call."""
    names, params = zip(*((name, p.detach()) for name, p in model.named_parameters()))
    averages = [ema[name] for name in names]
    if any(p.dtype != a.dtype for p, a in zip(params, averages)):
        params = [p.to(a.dtype) for p, a in zip(params, averages)]
    torch._foreach_lerp_(averages, list(params), 1 - decay)


def rows_of(draws: dict, rows: slice, device) -> dict:
    """A micro-batch's part of a step's ``model.draw_randomness``, on ``device``: each tensor's ``rows``, each
    scale's rows of a list, and a tuple (a flexible model's list of sides, shared by every row) whole."""
    return {k: (v if isinstance(v, tuple) else
                [t[rows].to(device) for t in v] if isinstance(v, list) else v[rows].to(device))
            for k, v in draws.items()}


def forward_backward(net, data, labels, draws: dict, inputs: dict, *, autocast, accumulation: int = 1):
    """A micro-batch's share of a training step: the family's loss, ``net(data, labels, **draws, **inputs)``, and
    its backward. ``net`` is the model or its DDP wrapper; ``data`` is what the latent source gives the family
    (FlowAR and xAR: latents, FlexVAR: tokenizer features, VAR: token maps), ``draws`` the rows' part of
    ``model.draw_randomness`` (:func:`rows_of`), ``inputs`` ``model.training_inputs``. The loss is divided by
    ``accumulation`` so that the micro-batches of a step add up to the gradient of their mean. Returns the
    model's output (its ``loss`` and ``loss_per_scale``)."""
    with autocast:
        out = net(data, labels, **draws, **inputs)
        (out.loss / accumulation).backward()
    return out


def apply_gradients(model: torch.nn.Module, optimizer, ema: dict, *, grad_clip: float, decay: float) -> torch.Tensor:
    """The end of a training step: the gradients' norm clipped at ``grad_clip`` (0: not clipped), the optimiser's
    step, the gradients cleared, the EMA updated at ``decay``. Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, decay)
    return grad_norm


def step_generator(seed: int, step: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def build_model(cfg: TrainConfig) -> FlowAR | VAR | FlexVAR | XAR:
    if cfg.preset in XAR_PRESETS:
        return XAR(get_xar_preset(cfg.preset, **cfg.model))
    if cfg.preset in VAR_PRESETS:
        return VAR(get_var_preset(cfg.preset, **cfg.model))
    if cfg.preset in FLEXVAR_PRESETS:
        return FlexVAR(get_flexvar_preset(cfg.preset, **cfg.model))
    return FlowAR(get_preset(cfg.preset, **cfg.model))


def check_data_matches(model, source: LatentSource) -> None:
    """Fail before the first step if the data cannot feed the model (its kind, latent shape, or tokenizer)."""
    if model.training_data != source.kind:
        raise ValueError(f"preset {type(model).__name__} trains on {model.training_data} but the data gives "
                         f"{source.kind}: set {'tokenizer=... or a token' if model.training_data == 'tokens' else 'vae=... or a'}"
                         " latent_cache")
    model.check_training_source(source)


def sample_images(model, source: LatentSource, labels, *, batch_size: int, generator=None, noise=None):
    """Decoded images (B, 3, H, W) in [-1, 1] (None without a decoder), from ``noise`` or ``generator``."""
    out = generate(model, labels, autoencoder=source.autoencoder, batch_size=batch_size, generator=generator,
                   noise=noise)
    return source.decode(out.decoder_input)


# ---------------------------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    rank, world, device = setup_distributed()
    is_main = rank == 0
    micro = cfg.global_batch // cfg.grad_accum
    if micro % world:
        raise ValueError(f"global_batch / grad_accum ({micro}) must be divisible by the {world} processes")
    local = micro // world
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)

    source: LatentSource = build_latent_source(cfg, device=device, load_vae=is_main)
    model = build_model(cfg).to(device)
    check_data_matches(model, source)
    if cfg.compile:
        model.compile()  # in place: parameter names, and so checkpoints, stay as they are
    model_inputs = model.training_inputs(source.autoencoder)  # VAR: its frozen tokenizer; FlowAR: nothing
    optimizer = build_optimizer(model, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    checkpoints = CheckpointManager(out_dir)
    start_step = 0
    if resume:
        state = checkpoints.load_last(map_location=device)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint in out_dir {out_dir}")
        if state["config"]["model"] != cfg.to_dict()["model"] or state["config"]["preset"] != cfg.preset:
            raise ValueError("--resume: the checkpoint's preset/model settings differ from this config's")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema = {k: v.to(device) for k, v in state["ema"].items()}
        start_step = state["step"]
    ddp = DistributedDataParallel(model) if world > 1 else model

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step if resume else None)
        print(f"training {cfg.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
              f"{source.describe()}, {world} process(es), global batch {cfg.global_batch} = {world} x {local} "
              f"x {cfg.grad_accum} accumulation, steps {start_step} -> {cfg.total_steps}, out_dir {out_dir}")
    autocast = autocast_context(device, torch.bfloat16 if cfg.bf16 else None)
    grid = SampleGrid(model, device) if is_main and cfg.sample_every else None
    fid = InTrainingFID(cfg, out_dir, device) if is_main and cfg.fid_every else None
    bar = tqdm(total=cfg.total_steps, initial=start_step, desc="train", disable=not (is_main and cfg.progress),
               dynamic_ncols=True)
    model.train()
    last_time, images_since = time.perf_counter(), 0
    for step in range(start_step, cfg.total_steps):
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = step_generator(cfg.seed, step, "cpu")
        indices = source.batch_indices(step, cfg.global_batch, generator)
        data_randomness = source.draw_randomness(cfg.global_batch, generator)
        randomness = model.draw_randomness(cfg.global_batch, generator=generator, device="cpu")
        torch.manual_seed(cfg.seed * 1_000_003 + step * 64 + rank)  # dropout masks, reproducible on resume
        loss_sum = torch.zeros((), device=device)
        sides = randomness.get("scales", model.config.scales)  # a flexible model's list of this step
        scale_sum = torch.zeros(len(sides), device=device)
        for accum in range(cfg.grad_accum):
            lo = accum * micro + rank * local
            rows = slice(lo, lo + local)
            data, labels = source.get(indices[rows], {k: v[rows] for k, v in data_randomness.items()})
            data = [t.to(device) for t in data] if isinstance(data, list) else data.to(device)  # VAR: K maps
            sync = contextlib.nullcontext() if (accum == cfg.grad_accum - 1 or world == 1) else ddp.no_sync()
            with sync:
                out = forward_backward(ddp, data, None if model.config.unconditional else labels.to(device),
                                       rows_of(randomness, rows, device), model_inputs, autocast=autocast,
                                       accumulation=cfg.grad_accum)
            loss_sum += out.loss.detach().float() / cfg.grad_accum
            scale_sum += out.loss_per_scale.float() / cfg.grad_accum
        if world > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(scale_sum)
            loss_sum /= world
            scale_sum /= world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {step}; stopping. The last good checkpoint "
                f"({checkpoints.last_path if checkpoints.last_path.exists() else 'none yet'}) is left untouched. "
                f"Try a lower lr, a longer warmup or bf16=false, then resume."
            )
        done = step + 1
        grad_norm = apply_gradients(model, optimizer, ema, grad_clip=cfg.grad_clip,
                                    decay=ema_decay(cfg.ema, done, bias_correction=cfg.ema_bias_correction))
        images_since += cfg.global_batch
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

        if is_main and (done % cfg.log_every == 0 or done == cfg.total_steps):
            now = time.perf_counter()
            writer.add_scalar("train/loss", loss_value, done)
            for k, side in enumerate(sides):
                writer.add_scalar(f"train/loss_scale_{side}x{side}", scale_sum[k].item(), done)
            writer.add_scalar("train/grad_norm", float(grad_norm), done)
            writer.add_scalar("train/lr", lr, done)
            writer.add_scalar("train/images_per_sec", images_since / max(now - last_time, 1e-9), done)
            last_time, images_since = now, 0
        if is_main and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.total_steps):
            with ema_weights(model, ema):
                grid.log(writer, "samples/ema_grid", model, source.autoencoder, done)
        if fid is not None and (done % cfg.fid_every == 0 or done == cfg.total_steps):
            writer.add_scalar("eval/fid", fid(model, ema, source), done)
        if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
            if is_main:
                checkpoints.save({"model": model.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                                  "step": done, "config": cfg.to_dict()})
            if world > 1:
                dist.barrier()
    bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return out_dir


@contextlib.contextmanager
def ema_weights(model: FlowAR | VAR, ema: dict):
    """Run the block with the EMA weights in eval mode, then put the live weights and train mode back."""
    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.load_state_dict(ema, strict=False)
    model.eval()
    try:
        yield model
    finally:
        model.load_state_dict(live, strict=False)
        model.train()


class SampleGrid:
    """TensorBoard grids of a model's samples: one row of ``PER_ROW`` per class (4 rows for an unconditional
    model), from the same seeds every time, so grids logged at different steps, or of different models of one
    config, are comparable."""

    PER_ROW = 8
    FIRST_SEED = 1234

    def __init__(self, model: FlowAR | VAR, device):
        c = model.config
        rows = min(c.num_classes, 10) if not c.unconditional else 4
        self.size = rows * self.PER_ROW
        self.labels = None if c.unconditional else torch.arange(rows, device=device).repeat_interleave(self.PER_ROW)
        self.noise = [n.to(device) for n in model.noise_from_seeds(list(range(self.FIRST_SEED, self.FIRST_SEED + self.size)))]

    @torch.no_grad()
    def log(self, writer, tag: str, model: FlowAR | VAR, autoencoder, step: int) -> None:
        """Sample ``model`` from the grid's noise, decode with ``autoencoder`` and log the grid under ``tag``
        (nothing without an autoencoder)."""
        if autoencoder is None:
            return
        out = generate(model, self.labels, autoencoder=autoencoder, batch_size=self.size, noise=self.noise)
        images = autoencoder.decode(out.decoder_input.to(next(autoencoder.parameters()).device))
        grid = image_grid(to_uint8_images(images), self.PER_ROW)
        writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")


class InTrainingFID:
    """A small-sample FID of the EMA weights, from the same seeds every time so the curve is comparable.

    The Inception network is loaded once. The reference is ``cfg.fid_reference`` (cached by eval.fid
    like any reference set), or else the training images: the bundled digits, or up to
    ``FOLDER_REFERENCE_IMAGES`` center-cropped images of the training folder (its broken files pruned
    and reported), whose statistics are computed once, before the first step, into
    ``out_dir/fid-reference.npz``. For ImageNet, pass the ADM reference batch as fid_reference.
    """

    FOLDER_REFERENCE_IMAGES = 10_000

    def __init__(self, cfg: TrainConfig, out_dir: Path, device: torch.device):
        self.cfg, self.device = cfg, device
        self.network = load_feature_network(device=device)
        if cfg.fid_reference:
            self.reference = cfg.fid_reference
            return
        data = cfg.data
        if cfg.latent_cache:  # the cache records which images it encoded
            data = json.loads((Path(cfg.latent_cache) / CACHE_INDEX).read_text()).get("data", "")
        if data.lower() != "mnist" and not (data and Path(data).is_dir()):
            raise ValueError(f"fid_every is set but the training images are unknown ({data!r}): set fid_reference")
        self.reference = out_dir / "fid-reference.npz"
        if not self.reference.is_file():
            write_stats_npz(self.reference, *feature_statistics(self.network(self._real_images(data), progress=False)))

    def _real_images(self, data: str) -> np.ndarray:
        """The training images as uint8 (N, S, S[, 3]), deterministic (no augmentation)."""
        if data.lower() == "mnist":
            return MNISTDataset(image_size=self.cfg.image_size, split="train").images.numpy()
        folder = ImageFolderDataset(data, image_size=self.cfg.image_size, train=False)
        print(folder.verify())
        count = min(len(folder), self.FOLDER_REFERENCE_IMAGES)
        picks = np.linspace(0, len(folder) - 1, count).round().astype(int)
        return to_uint8_images(torch.stack([folder[int(i)][0] for i in picks]))

    @torch.no_grad()
    def __call__(self, model: FlowAR | VAR, ema: dict, source: LatentSource) -> float:
        c = model.config
        generator = torch.Generator(self.device).manual_seed(2024)
        images, batch = [], 100
        with ema_weights(model, ema):
            for start in range(0, self.cfg.fid_samples, batch):
                n = min(batch, self.cfg.fid_samples - start)
                labels = None if c.unconditional else torch.arange(start, start + n, device=self.device) % c.num_classes
                decoded = sample_images(model, source, labels, batch_size=n, generator=generator)
                if decoded is None:
                    raise ValueError("in-training FID needs the VAE to decode samples; set vae=...")
                images.append(to_uint8_images(decoded))
        result = compute_metrics(np.concatenate(images), self.reference, network=self.network, device=self.device,
                                 image_size=self.cfg.image_size, cache_dir=default_cache_dir(), progress=False)
        return result["fid"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides (model.KEY=VALUE for model fields)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"train: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
