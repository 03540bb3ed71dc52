"""The end-to-end demo on the bundled MNIST digits, on the CPU in about ten minutes:

    python -m train.demo --out runs/demo                 # FlowAR
    python -m train.demo --out runs/demo-var --model var # the VAR baseline, same training budget

FlowAR:
1. train a small diffusers AutoencoderKL on the digits (32x32 -> 4x8x8 latents),
2. cache the VAE posteriors of the 4,500 training digits,
3. train a small class-conditional FlowAR on the cache (scales 1, 2, 4, 8), with TensorBoard logs,
4. export its EMA weights with the VAE as a pipeline folder, and sample a 10x10 grid, one row per digit,
5. score 1,000 samples (100 per digit) with the digit classifier of ``eval.quality``: class-consistency.

VAR: the same, with VAR's multi-scale VQ tokenizer (scales 1, 2, 4, 8) instead of the VAE and a VAR
transformer trained with the same steps, batch and learning-rate schedule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eval.quality import DigitScorer, sample_digits
from flowar import load_pipeline
from flowar.outputs import image_grid

from .cache_latents import cache_latents
from .config import load_config
from .data import MNISTDataset
from .export import export
from .latents import load_any_vae, load_tokenizer
from .train import train
from .train_tokenizer import train_tokenizer
from .train_vae import train_vae

# A FlowAR small enough for a CPU: 2+2 blocks of width 128 and a 2-block transformer head. No dropout: in
# 400 steps (6 epochs) the model underfits, and dropping it (with lr 2e-3) took class-consistency from 76%
# to 89% at the same cost.
DEMO_FLOWAR = {"num_classes": 10, "token_dim": 4, "scales": [1, 2, 4, 8], "width": 128, "num_heads": 4,
               "head_width": 128, "head_depth": 2, "attn_dropout": 0.0, "proj_dropout": 0.0,
               "sampling": {"guidance_scale": 6.0, "steps": 10}}
# The VAR baseline at about the same transformer size: 4 blocks of width 128 (var-tiny); scales, vocabulary
# and code size come from the tokenizer.
DEMO_VAR = {"num_classes": 10, "sampling": {"guidance_scale": 6.0}}
# The sampling settings above are saved as each release's defaults and make the grid and the score: the
# linear guidance ramp, at the guidance scale that gave the lowest Frechet distance of 500 samples in the
# digit classifier's features (FlowAR 1.5 to 10; VAR 2.5 to 9, i.e. VAR's own cfg 1.5 to 8; README,
# "FlowAR and the VAR baseline").


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for every output")
    p.add_argument("--model", default="flowar", choices=("flowar", "var"))
    p.add_argument("--vae-steps", type=int, default=None,
                   help="VAE (FlowAR, default 300) or tokenizer (VAR, default 600) training steps")
    p.add_argument("--steps", type=int, default=400, help="FlowAR / VAR training steps")
    p.add_argument("--per-class", type=int, default=100, help="samples per digit for the score (0: no score)")
    args = p.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    var = args.model == "var"

    if var:
        steps = args.vae_steps or 600  # what every scale needs to use over half of the codebook
        print(f"[1/5] training the MNIST multi-scale VQ tokenizer ({steps} steps)")
        encoder_dir = out / "tokenizer"
        result = train_tokenizer(encoder_dir, steps=steps)
        usage = " ".join(f"{s}x{s}:{u:.0%}" for s, u in zip(result["scales"], result["usage"]))
        print(f"      held-out reconstruction PSNR {result['psnr']:.2f} dB, codebook use per scale {usage}")
        encoder = load_tokenizer(str(encoder_dir))
    else:
        steps = args.vae_steps or 300
        print(f"[1/5] training the MNIST VAE ({steps} steps)")
        encoder_dir = out / "vae"
        result = train_vae(encoder_dir, steps=steps)
        print(f"      held-out reconstruction PSNR {result['psnr']:.2f} dB, scaling factor {result['scaling_factor']:.3f}")
        encoder = load_any_vae(str(encoder_dir))

    print("[2/5] caching the " + ("token maps" if var else "VAE latents") + " of the training digits")
    cache_dir = cache_latents(MNISTDataset(image_size=32, split="train"), encoder, out / ("tokens" if var else "latents"),
                              vae_path=str(encoder_dir), data_source="mnist")

    name = "VAR" if var else "FlowAR"
    print(f"[3/5] training {name} ({args.steps} steps)")
    model = dict(DEMO_FLOWAR)
    if var:  # the transformer's vocabulary and inputs are the tokenizer's
        model = {**DEMO_VAR, "scales": list(encoder.scales), "vocab_size": encoder.codebook_size,
                 "code_dim": encoder.code_dim}
    cfg = load_config(None, [
        f"latent_cache={cache_dir}", f"out_dir={out / args.model}", f"preset={'var' if var else 'flowar'}-tiny",
        "global_batch=64", f"total_steps={args.steps}", "warmup_steps=40", "lr=2e-3", "min_lr=1e-4", "ema=0.995",
        "checkpoint_every=100", f"sample_every={max(args.steps // 4, 1)}", "log_every=10",
        *(f"model.{k}={json.dumps(v)}" for k, v in model.items()),
    ])
    run_dir = train(cfg)

    print("[4/5] exporting the EMA weights and sampling a 10x10 grid")
    release = export(run_dir, out / f"{args.model}-release")
    pipe = load_pipeline(release)
    labels = [digit for digit in range(10) for _ in range(10)]
    images = pipe(labels, output_type="np", generator=torch.Generator().manual_seed(0))
    grid_path = out / "grid.png"
    image_grid(images, nrow=10).save(grid_path)

    report = None
    if args.per_class:
        print(f"[5/5] scoring {10 * args.per_class} samples with the digit classifier")
        scorer = DigitScorer.load_or_train(out / "digit-classifier", progress=False)
        images, labels = sample_digits(pipe, per_class=args.per_class, seed=1)
        report = scorer.score(images, labels)
        print("      " + report.summary())

    print(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min. Outputs:")
    print(f"  {'tokenizer' if var else 'VAE'} (folder)".ljust(32) + str(encoder_dir))
    print(f"  {'token' if var else 'latent'} cache".ljust(32) + str(cache_dir))
    print("  training run + checkpoints".ljust(32) + str(run_dir))
    print("  TensorBoard logs".ljust(32) + f"{run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir})")
    print(f"  release folder (EMA + {'tokenizer' if var else 'VAE'})".ljust(32) + str(release))
    print("  sample grid, row = digit".ljust(32) + str(grid_path))
    if report is not None:
        print("  digit classifier".ljust(32) + str(out / "digit-classifier"))
        print("  class-consistency".ljust(32) + f"{report.class_consistency:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
