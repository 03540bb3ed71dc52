"""Write a run's EMA weights as a release folder: config.json + model.safetensors, plus the run's VAE in
``vae/`` (FlowAR) or its tokenizer in ``tokenizer/`` (VAR) when known, so the folder is a whole pipeline.

    python -m train.export runs/flowar-mnist runs/flowar-mnist-release
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowar.registry import pipeline_class
from vae.files import write_class_names

from .checkpoint import CheckpointManager
from .config import TrainConfig
from .latents import CACHE_INDEX
from .train import build_model


def export(run_dir, out_dir, *, with_vae: bool = True) -> Path:
    """Load the run's last checkpoint, put the EMA weights in the model, and save a release folder."""
    state = CheckpointManager(run_dir).load_last()
    if state is None:
        raise FileNotFoundError(f"run_dir {run_dir} holds no checkpoint")
    cfg = TrainConfig(**{**state["config"], "betas": tuple(state["config"]["betas"])})
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.load_state_dict(state["ema"], strict=False)  # EMA covers every parameter; buffers stay
    model.save_pretrained(out_dir)
    index = {}
    if cfg.latent_cache and (Path(cfg.latent_cache) / CACHE_INDEX).is_file():
        index = json.loads((Path(cfg.latent_cache) / CACHE_INDEX).read_text())
    # The pipeline's autoencoder folder ("vae" / "tokenizer") is also the run config's and cache index's key.
    pipeline = pipeline_class(model.model_type)
    key = pipeline.autoencoder_folder
    source = getattr(cfg, key) or index.get(key, "")
    if with_vae and source:
        autoencoder = pipeline.load_autoencoder(source, model=model)
        autoencoder.save_pretrained(Path(out_dir) / pipeline.autoencoder_folder)
    if index.get("classes") and len(index["classes"]) == model.config.num_classes:
        write_class_names(out_dir, index["classes"])  # the data's class folder names, shown by applications
    return Path(out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--no-vae", action="store_true", help="do not copy the run's VAE (or VAR tokenizer) into out_dir")
    args = p.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, with_vae=not args.no_vae)
    except (ValueError, FileNotFoundError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"exported EMA weights of {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
