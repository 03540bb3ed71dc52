"""``flowar-sample``: sample a grid of images from a saved pipeline folder or a released checkpoint.

    flowar-sample my-pipeline/ --labels 1,2,3 --num-images 4 --guidance-scale 4 --steps 25 --out grid.png
    flowar-sample FlowAR-S.pth --preset flowar-s --vae kl16.ckpt --labels 207,360 --out grid.png
    flowar-sample var_d16.pth --preset var-d16 --tokenizer vae_ch160v4096z32.pth --labels 207,360 --var-cfg 1.5
    flowar-sample FlexVARd16-epo179.pth --preset flexvar-d16 --tokenizer FlexVAE.pth --labels 207 --scales 1,2,4,8,12,16,24,32

One command for every family: the folder's config.json (``model_type``) or the ``--preset`` picks the model
class and pipeline from ``flowar.registry``. Sampling options left out take the model's saved defaults; an
option the family's sampling does not have is refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from heads.solvers import SCHEDULES, SOLVERS
from vae.files import read_config
from vae.flexvq import FLEXVQ_PRESETS
from vae.msvq import MSVQ_PRESETS
from vae.pyramid import parse_scale_list

from .config import PRESETS
from .flexvar_config import FLEXVAR_PRESETS
from .flexvar_pipeline import load_flexvq_tokenizer
from .outputs import image_grid
from .registry import model_type, pipeline_class
from .sampling import CFG_SCHEDULES
from .var_config import VAR_PRESETS, VARSampling
from .xar_config import XAR_PRESETS, XAR_SOLVERS
from .var_pipeline import RELEASED_TOKENIZER, load_tokenizer

# Sampling options: argparse destination -> the field (or replace() keyword) of a family's options dataclass.
FLOW_SOLVERS = tuple(dict.fromkeys((*SOLVERS, *XAR_SOLVERS)))  # every family's; the model checks its own
SAMPLING_OPTIONS = ("guidance_scale", "cfg_schedule", "scales", "guidance_interval", "solver", "steps", "schedule",
                    "atol", "rtol", "top_k", "top_p", "temperature", "more_smooth", "var_cfg", "greedy_above")
# The model type of each preset, for a released file.
PRESET_KINDS = {**{name: "flowar" for name in PRESETS}, **{name: "var" for name in VAR_PRESETS},
                **{name: "flexvar" for name in FLEXVAR_PRESETS}, **{name: "xar" for name in XAR_PRESETS}}


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


def parse_step_counts(text: str) -> int | tuple[int, ...]:
    """A step or jump count of every command line: "25", or one count per scale or cell, "20,20,20,10" or
    "20/20/20/10"."""
    try:
        counts = tuple(int(part) for part in text.replace(" ", "").replace("/", ",").split(",") if part)
    except ValueError:
        counts = ()
    if not counts:
        raise argparse.ArgumentTypeError(f"takes an integer or one per scale, e.g. 25, 20,20,20,10 or 20/20/20/10; "
                                         f"got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def parse_scales(text: str) -> tuple:
    """``--scales``: "1,2,4,8,12", or "1,2,4,8x12" for a grid that is not square (``vae.pyramid.parse_scale_list``)."""
    try:
        return parse_scale_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--{err}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowar-sample",
        description="Sample images from a FlowAR, VAR or FlexVAR pipeline folder (config.json + model.safetensors "
                    "with a vae/ or tokenizer/ folder) or from a released checkpoint (.pth) with --preset.",
    )
    p.add_argument("path", help="pipeline folder, or a released .pth checkpoint (then --preset is required)")
    p.add_argument("--preset", choices=sorted(PRESET_KINDS), help="architecture of a released .pth checkpoint")
    p.add_argument("--vae", help="FlowAR's VAE: a diffusers folder or hub id, or MAR's kl16.ckpt "
                                 "(default: the vae/ folder beside the model)")
    p.add_argument("--tokenizer", help="VAR's or FlexVAR's tokenizer: our folder, or VAR's vae_ch160v4096z32.pth / "
                                       "FlexVAR's FlexVAE.pth (default: the tokenizer/ folder beside the model)")
    p.add_argument("--tokenizer-preset", choices=sorted(MSVQ_PRESETS) + sorted(FLEXVQ_PRESETS), default=None,
                   help="architecture of a tokenizer .pth (default: the family's released one, VAR's "
                        f"{RELEASED_TOKENIZER} or FlexVAR's flexvae); a VAR tokenizer's scales follow the model")
    p.add_argument("--labels", type=parse_labels, help="class ids, e.g. 207,360 (omit for unconditional)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images for an unconditional model, or per label for a conditional one (default 1)")
    guidance = p.add_argument_group("guidance and scales (every family; default: the model's)")
    guidance.add_argument("--guidance-scale", type=float, default=None, help="1 = unguided")
    guidance.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                          help="linear: ramp from 1 at the first scale to the scale at the last")
    flowar = p.add_argument_group("FlowAR and xAR sampling (default: the model's)")
    flowar.add_argument("--guidance-interval", type=parse_interval, default=None, help="low,high in t (1 = noise)")
    flowar.add_argument("--steps", type=parse_step_counts, default=None,
                        help="steps per scale (FlowAR) or per cell (xAR), one count or one per scale, e.g. 20,20,20,10; "
                             "a flow-map head's jumps")
    flowar.add_argument("--solver", choices=FLOW_SOLVERS, default=None,
                        help="the flow's solver (sde: xAR's released sampler; flow-map: a flow-map head's jumps)")
    flowar.add_argument("--schedule", choices=SCHEDULES, default=None)
    guidance.add_argument("--scales", type=parse_scales, default=None,
                          help="sides to sample, e.g. 1,2,3,5,8 or 1,2,4,8,12 for larger images, HEIGHTxWIDTH for a "
                               "grid that is not square, e.g. 1,2,4,8x12 (FlexVAR, or a FlowAR with positions='grid'; "
                               "default: the model's scales)")
    flowar.add_argument("--atol", type=float, default=None, help="dopri5 tolerance")
    flowar.add_argument("--rtol", type=float, default=None, help="dopri5 tolerance")
    var = p.add_argument_group("VAR and FlexVAR sampling (default: the model's)")
    var.add_argument("--var-cfg", type=float, default=None,
                     help="guidance in VAR's own convention (0 = unguided; guidance scale = 1 + var-cfg)")
    var.add_argument("--top-k", type=int, default=None, help="keep the k most likely ids (0 = off)")
    var.add_argument("--top-p", type=float, default=None, help="nucleus mass (0 or 1 = off)")
    var.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    var.add_argument("--more-smooth", action="store_const", const=True, default=None,
                     help="VAR's Gumbel-softmax mixing of code vectors (for pictures, not FID)")
    var.add_argument("--greedy-above", type=int, default=None,
                     help="FlexVAR: sides above this are drawn greedily at full guidance (the released 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the generator under bf16 autocast")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator's hot modules first (pays off over many images)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: all in one row)")
    p.add_argument("--out", default="grid.png", help="output PNG path")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"flowar-sample: {err}", file=sys.stderr)
        return 2


def load_cli_pipeline(args):
    """The pipeline the command line names: a released file with --preset, or a saved folder."""
    path = Path(args.path)
    if path.is_file():
        if args.preset is None:
            raise ValueError(f"{path} is a checkpoint file; --preset is required "
                             f"(one of {', '.join(sorted(PRESET_KINDS))})")
        kind = PRESET_KINDS[args.preset]
    else:
        kind = model_type(path)
    cls = pipeline_class(kind)
    family_presets = {"var": MSVQ_PRESETS, "flexvar": FLEXVQ_PRESETS}.get(kind, {})
    if args.tokenizer_preset is not None and args.tokenizer_preset not in family_presets:
        raise ValueError(f"--tokenizer-preset {args.tokenizer_preset!r} is not a {kind} tokenizer architecture"
                         + (f" (one of {', '.join(sorted(family_presets))})" if family_presets else ""))
    own, other = ("tokenizer", "vae") if cls.autoencoder_folder == "tokenizer" else ("vae", "tokenizer")
    if getattr(args, other) is not None:
        raise ValueError(f"--{other} is for the other model family; {path} holds a {kind!r} model (use --{own})")
    source = getattr(args, own)
    if path.is_file() and source is None:
        raise ValueError(f"--{own} is required with a released checkpoint")
    if path.is_file():
        model = cls.model_class.from_released(path, args.preset)
        return cls(model, cli_autoencoder(cls, source, args, model.config.scales))
    autoencoder = None
    if source is not None:
        autoencoder = cli_autoencoder(cls, source, args, tuple(read_config(path)["scales"]))
    return cls.from_pretrained(path, autoencoder=autoencoder)


def cli_autoencoder(cls, source, args, scales):
    """--vae / --tokenizer; a tokenizer .pth is read in --tokenizer-preset's architecture (a VAR tokenizer with
    the model's scales)."""
    kind, preset = cls.model_class.model_type, args.tokenizer_preset
    if kind == "var":
        return load_tokenizer(source, scales=scales, preset=preset or RELEASED_TOKENIZER)
    if kind == "flexvar":
        return load_flexvq_tokenizer(source, preset=preset or "flexvae")
    return cls.load_autoencoder(source, model=None)


def run(args) -> int:
    pipe = load_cli_pipeline(args).to(args.device)
    if args.compile:
        pipe.compile()
    kind = pipe.model.model_type
    options = {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None}
    own = {f.name for f in dataclasses.fields(pipe.model.sampling_class)}
    if issubclass(pipe.model.sampling_class, VARSampling):
        own.add("var_cfg")  # VAR's own guidance convention, a keyword of its replace()
    foreign = [name for name in options if name not in own]
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ValueError(f"{flags}: not sampling option(s) of a {kind!r} model ({args.path})")
    per_label = args.num_images or 1
    labels = None if args.labels is None else [label for label in args.labels for _ in range(per_label)]
    batch_size = per_label if labels is None else None
    generator = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    images = pipe(labels, batch_size=batch_size, output_type="np", generator=generator, progress=True,
                  autocast_dtype=torch.bfloat16 if args.bf16 else None, **options)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, args.nrow or len(images)).save(out)
    print(f"wrote {len(images)} images to {out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
