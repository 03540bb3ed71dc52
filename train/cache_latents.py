"""Encode a dataset once into sharded safetensors files that training reads back.

    python -m train.cache_latents --data mnist --vae runs/mnist-vae --image-size 32 --out runs/mnist-latents
    python -m train.cache_latents --data mnist --tokenizer runs/mnist-tokenizer --out runs/mnist-tokens   # VAR

With a VAE (FlowAR), each item stores the posterior mean and std of the image and of its mirror image
(scaled latent space), so training can still draw fresh posterior samples and random flips without the
encoder. With VAR's tokenizer, each item stores its token maps (all scales, concatenated row-major) and
those of its mirror image. With FlexVAR's, its continuous features (as a posterior of std 0), which training
quantizes at each step's own list of sides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vae.files import atomic_write

from .latents import CACHE_INDEX, encodes_token_maps, load_any_vae, load_tokenizer


def write_cache(out_dir, shards: list[dict], *, classes: list, vae: str = "", extra: dict | None = None) -> Path:
    """Write shard dicts (mean, std, mean_flip, std_flip, labels) and the index; the index goes last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, shard in enumerate(shards):
        name = f"shard-{i:05d}.safetensors"
        tensors = {k: v.detach().clone().contiguous() for k, v in shard.items()}  # no shared storage
        atomic_write(out / name, lambda tmp: save_file(tensors, str(tmp)))
        names.append(name)
    index = {"num_items": sum(int(s["labels"].shape[0]) for s in shards), "shards": names,
             "num_classes": len(classes), "classes": [str(c) for c in classes], "vae": vae, **(extra or {})}
    # The index goes last: a cache without its index is never mistaken for a whole one.
    atomic_write(out / CACHE_INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    return out


@torch.no_grad()
def cache_latents(dataset, vae, out_dir, *, vae_path: str = "", data_source: str = "", batch_size: int = 64,
                  shard_size: int = 50_000, progress: bool = True) -> Path:
    """Encode every item of ``dataset`` (image in [-1, 1], label), and its mirror image unless the dataset
    says flips are wrong for it (``hflip`` False, e.g. digits); returns ``out_dir``. ``vae`` is a VAE
    (posteriors are cached), VAR's tokenizer (token maps are cached) or FlexVAR's (features are cached). ``vae_path`` (the VAE's or the
    tokenizer's) and ``data_source`` ("mnist" or the image folder) are recorded for training to find."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    flips = bool(getattr(dataset, "hflip", True))
    tokens = encodes_token_maps(vae)  # VAR's tokenizer: token maps instead of posteriors
    names = ("tokens",) if tokens else ("mean", "std")
    keys = (*names, *(f"{n}_flip" for n in names if flips), "labels")
    shards, current = [], {k: [] for k in keys}
    count = 0
    bar = tqdm(total=len(dataset), desc="encode", unit="img", disable=not progress)

    def flush():
        if current["labels"]:
            shards.append({k: torch.cat(v) for k, v in current.items()})
            for v in current.values():
                v.clear()

    def encode(x):
        if tokens:  # (B, L) int32: every scale's map, row-major, concatenated
            return (torch.cat([m.flatten(1) for m in vae.encode_indices(x)], 1).int(),)
        return vae.encode_distribution(x)

    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([img for img, _ in items])
        encoded = dict(zip(names, encode(images)))
        if flips:
            encoded.update(zip((f"{n}_flip" for n in names), encode(images.flip(-1))))
        for key, value in encoded.items():
            current[key].append(value.cpu() if tokens else value.float().cpu())
        current["labels"].append(torch.tensor([label for _, label in items], dtype=torch.long))
        count += len(items)
        bar.update(len(items))
        if sum(len(x) for x in current["labels"]) >= shard_size:
            flush()
    flush()
    bar.close()
    classes = list(getattr(dataset, "classes", []))
    extra = {"hflip": flips, "data": str(data_source)}
    if tokens:
        extra.update(kind="tokens", scales=list(vae.scales), tokenizer=vae_path)
        return write_cache(out_dir, shards, classes=classes, extra=extra)
    extra.update(kind="latents", scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor,
                 latents_mean=getattr(vae, "latents_mean", None), latents_std=getattr(vae, "latents_std", None))
    if hasattr(vae, "quantize_features"):  # FlexVAR's tokenizer: its features, which training quantizes
        extra["tokenizer"] = vae_path
        vae_path = ""
    return write_cache(out_dir, shards, classes=classes, vae=vae_path, extra=extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", help='"mnist" or an image folder')
    encoder = p.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--vae", help="FlowAR: diffusers VAE folder / hub id, or MAR kl16.ckpt")
    encoder.add_argument("--tokenizer", help="VAR or FlexVAR: a tokenizer folder, or vae_ch160v4096z32.pth / "
                                             "FlexVAE.pth")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=50_000, help="items per safetensors shard")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from .data import ImageFolderDataset, MNISTDataset

    try:
        # The training images with the deterministic (center-crop) transform: augmentation at encode
        # time would freeze one random view per image into the cache.
        if args.data.lower() == "mnist":
            dataset = MNISTDataset(image_size=args.image_size, split="train")
        else:
            dataset = ImageFolderDataset(args.data, image_size=args.image_size, train=False)
            print(dataset.verify())
        encoder = load_tokenizer(args.tokenizer) if args.tokenizer else load_any_vae(args.vae)
        data_source = "mnist" if args.data.lower() == "mnist" else str(Path(args.data).resolve())
        out = cache_latents(dataset, encoder.to(args.device), args.out, vae_path=str(args.tokenizer or args.vae),
                            data_source=data_source, batch_size=args.batch_size, shard_size=args.shard_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"cache_latents: {err}", file=sys.stderr)
        return 2
    flips = " and their mirror images" if getattr(dataset, "hflip", True) else ""
    print(f"wrote latent cache of {len(dataset)} images{flips} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
