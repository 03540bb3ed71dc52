"""``flowar-sample`` for VAR: sample a grid from a VAR pipeline folder or from VAR's released checkpoints.

    flowar-sample my-var-pipeline/ --labels 207,360 --cfg 1.5 --out grid.png
    flowar-sample var_d16.pth --preset var-d16 --tokenizer vae_ch160v4096z32.pth --labels 207,360 --out grid.png

:func:`is_var_invocation` tells a VAR command line from a FlowAR one (a folder whose config.json says
``"model_type": "var"``, or a ``--preset var-...``), so that ``flowar.cli.main`` (the entry point) can
hand it over to :func:`run` here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vae.msvq import MSVQ_PRESETS, get_msvq_preset

from .checkpoints import CONFIG_NAME
from .cli import parse_labels, sample_grid
from .var import MODEL_TYPE, VAR
from .var_config import VAR_PRESETS
from .var_pipeline import RELEASED_TOKENIZER, VARPipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowar-sample",
        description="Sample images from a VAR pipeline folder (config.json + model.safetensors + tokenizer/) "
                    "or from a released var_d{16,20,24,30}.pth with --preset and --tokenizer.",
    )
    p.add_argument("path", help="VAR pipeline folder, or a released .pth checkpoint (then --preset is required)")
    p.add_argument("--preset", choices=sorted(VAR_PRESETS), help="architecture of a released .pth checkpoint")
    p.add_argument("--tokenizer", help="tokenizer: our folder, or VAR's vae_ch160v4096z32.pth "
                                       "(default: the tokenizer/ folder beside the model)")
    p.add_argument("--tokenizer-preset", choices=sorted(MSVQ_PRESETS), default=RELEASED_TOKENIZER,
                   help="architecture of a tokenizer .pth (default: the released one); its scales follow the model")
    p.add_argument("--labels", type=parse_labels, help="class ids, e.g. 207,360 (omit for unconditional)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images for an unconditional model, or per label for a conditional one (default 1)")
    p.add_argument("--cfg", type=float, default=None,
                   help="VAR guidance: logits (1+t) cond - t uncond, t ramping to cfg (0 = unguided; "
                        "default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely ids (0 = off; default: the model's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (0 or 1 = off; default: the model's)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the transformer under bf16 autocast")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: all in one row)")
    p.add_argument("--out", default="grid.png", help="output PNG path")
    return p


def is_var_invocation(argv) -> bool:
    """True when ``argv`` (without the program name) asks for a VAR model: a ``--preset var-...``, or a
    folder whose config.json holds ``"model_type": "var"``."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("path", nargs="?")
    probe.add_argument("--preset")
    known, _ = probe.parse_known_args(list(argv))
    if known.preset is not None:
        return known.preset in VAR_PRESETS
    if known.path is None:
        return False
    config = Path(known.path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False  # let the FlowAR command report the broken folder


def run(args) -> int:
    path = Path(args.path)
    if path.is_file():
        if args.preset is None:
            raise ValueError(f"{path} is a checkpoint file; --preset is required "
                             f"(one of {', '.join(sorted(VAR_PRESETS))})")
        if args.tokenizer is None:
            raise ValueError("--tokenizer is required with a released checkpoint (e.g. vae_ch160v4096z32.pth)")
        model = VAR.from_released(path, args.preset)
        pipe = VARPipeline(model, load_cli_tokenizer(args.tokenizer, args.tokenizer_preset, model.config.scales))
    else:
        tokenizer = None
        if args.tokenizer is not None:
            tokenizer = load_cli_tokenizer(args.tokenizer, args.tokenizer_preset, _folder_scales(path))
        pipe = VARPipeline.from_pretrained(path, tokenizer=tokenizer)
    return sample_grid(pipe, args, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)


def load_cli_tokenizer(source, preset: str, scales):
    """A tokenizer folder, or a .pth with the authors' key names in the architecture ``preset``, with ``scales``."""
    from vae.msvq import MultiScaleVQVAE

    path = Path(source)
    if path.is_file():
        return MultiScaleVQVAE.from_released(path, get_msvq_preset(preset, scales=tuple(scales)))
    return MultiScaleVQVAE.from_pretrained(path)


def _folder_scales(path: Path):
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"path {path} has no {CONFIG_NAME}")
    return tuple(json.loads(config.read_text())["scales"])
