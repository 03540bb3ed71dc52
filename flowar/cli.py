"""``flowar-sample``: sample a grid of images from a saved or released FlowAR model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from heads.solvers import SCHEDULES, SOLVERS

from .config import PRESETS
from .model import CFG_SCHEDULES, FlowAR
from .pipeline import FlowARPipeline, image_grid, load_vae


def parse_labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels must be comma-separated integers, got {text!r}") from None


def parse_interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guidance-interval must be 'low,high', got {text!r}") from None
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowar-sample",
        description="Sample images from a FlowAR model folder (config.json + model.safetensors, with an "
                    "optional vae/ folder) or from a released FlowAR-{S,L,H}.pth with --preset.",
    )
    p.add_argument("path", help="model folder, or a released .pth checkpoint (then --preset is required)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="architecture of a released .pth checkpoint")
    p.add_argument("--vae", help="VAE: a diffusers folder or hub id, or MAR's kl16.ckpt "
                                 "(default: the vae/ folder beside the model)")
    p.add_argument("--labels", type=parse_labels, help="class ids, e.g. 207,360 (omit for unconditional)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images for an unconditional model, or per label for a conditional one (default 1)")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the preset's)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="linear")
    p.add_argument("--guidance-interval", type=parse_interval, default=None, help="low,high in t (1 = noise)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps per scale (default: the preset's)")
    p.add_argument("--solver", choices=SOLVERS, default="euler")
    p.add_argument("--schedule", choices=SCHEDULES, default="flowar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the networks under bf16 autocast")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: all in one row)")
    p.add_argument("--out", default="grid.png", help="output PNG path")
    return p


def main(argv=None) -> int:
    from .var_cli import is_var_invocation, run as run_var  # VAR folders and --preset var-* go there
    from .var_cli import build_parser as build_var_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    if is_var_invocation(argv):
        return report_errors(run_var, build_var_parser().parse_args(argv))
    return report_errors(run, build_parser().parse_args(argv))


def report_errors(run_command, args) -> int:
    """``run_command(args)``; a bad argument or a missing file becomes one line on stderr and exit status 2."""
    try:
        return run_command(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"flowar-sample: {err}", file=sys.stderr)
        return 2


def sample_grid(pipe, args, **sample_kwargs) -> int:
    """Sample ``args.labels`` (``args.num_images`` each, or that many unconditional images) with ``pipe``
    on ``args.device`` and write them as one grid to ``args.out``."""
    pipe.to(args.device)
    per_label = args.num_images or 1
    labels = None if args.labels is None else [label for label in args.labels for _ in range(per_label)]
    batch_size = (args.num_images or 1) if labels is None else None
    generator = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    images = pipe(labels, batch_size=batch_size, output_type="np", generator=generator, progress=True,
                  autocast_dtype=torch.bfloat16 if args.bf16 else None, **sample_kwargs)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, args.nrow or len(images)).save(out)
    print(f"wrote {len(images)} images to {out} in {elapsed:.1f} s")
    return 0


def run(args) -> int:
    path = Path(args.path)
    if path.is_file():
        if args.preset is None:
            raise ValueError(f"{path} is a checkpoint file; --preset is required (one of {', '.join(sorted(PRESETS))})")
        if args.vae is None:
            raise ValueError("--vae is required with a released checkpoint (e.g. MAR's kl16.ckpt)")
        pipe = FlowARPipeline(FlowAR.from_released(path, args.preset), load_vae(args.vae))
    else:
        pipe = FlowARPipeline.from_pretrained(path, vae=args.vae)
    return sample_grid(pipe, args, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                       guidance_interval=args.guidance_interval, steps=args.steps, solver=args.solver,
                       schedule=args.schedule)


if __name__ == "__main__":
    raise SystemExit(main())
