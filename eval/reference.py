"""Image sets for FID: folders, ADM ``.npz`` files, in-memory arrays; their Inception features, cached.

A set is given as one of
  * an image folder: every image below it (recursive, sorted, hidden entries skipped, the extensions of
    ``train.data.IMG_EXTENSIONS``), optionally brought to ``image_size`` with ADM's center crop
    (``train.data.center_crop``: box-filter halving, bicubic resize, central square);
  * an ADM sample batch: ``.npz`` with ``arr_0`` uint8 (N, H, W, 3), read in batches straight from the
    zip so a 50k x 256 x 256 file never has to fit in memory; images are used as they are;
  * an ADM reference batch / statistics file: ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D). When it also
    holds ``arr_0`` (as ADM's reference batches do) FID uses the stored ``mu``/``sigma`` and KID and
    precision/recall use features of the stored images, as ADM's evaluator does;
  * a uint8 array or tensor in memory (``eval.inception.as_uint8_nchw`` layouts), never written to disk.

``.npz`` files are always opened with ``allow_pickle=False``: a file holding object arrays is refused.

Feature cache: features of a set on disk are saved to ``cache_dir/<key>.npz`` (``features`` float32 when
that is exact, which it is for float32 networks, and a ``description``), the key a hash of the set's
resolved path, its file listing with sizes and modification times, the network's identity (weights hash
and preprocessing version) and ``image_size``. Touching, adding or removing a file changes the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vae.files import atomic_write
from train.data import IMG_EXTENSIONS, center_crop, load_image

from .inception import FeatureNetwork, as_uint8_nchw

IMAGES_KEY = "arr_0"
CACHE_VERSION = 1
_DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes without the GIL


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flowar/fid-features`` (``~/.cache/flowar/fid-features`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "flowar" / "fid-features"


# ----------------------------------------------------------------------------------------------------
# ADM .npz files


def _npz_keys(path: Path) -> list[str]:
    with np.load(path, allow_pickle=False) as npz:
        return list(npz.files)


def _check_npz_path(path, name: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} is not an existing file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{name} {str(path)!r} is not an .npz file (a zip archive of .npy arrays)")
    return path


def write_images_npz(path: str | os.PathLike, images) -> None:
    """Write uint8 ``images`` (any ``as_uint8_nchw`` layout) as an ADM sample batch: ``arr_0`` uint8
    (N, H, W, 3), grey repeated to RGB. Written to a temporary file and renamed."""
    nhwc = as_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()
    atomic_write(Path(path), lambda tmp: _savez(tmp, **{IMAGES_KEY: nhwc}))


def write_stats_npz(path: str | os.PathLike, mu, sigma) -> None:
    """Write FID statistics as an ADM reference file: ``mu`` float64 (D,), ``sigma`` float64 (D, D)."""
    mu, sigma = _check_stats(np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64), str(path))
    atomic_write(Path(path), lambda tmp: _savez(tmp, mu=mu, sigma=sigma))


def _savez(tmp: Path, **arrays) -> None:
    # A file object, because np.savez appends ".npz" to a file name that lacks it.
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{where}: mu must be (D,) and sigma (D, D), got shapes {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu/sigma hold NaN or inf values")
    return mu, sigma


def read_stats_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), sigma (D, D))`` float64 from an ADM reference / statistics ``.npz``."""
    path = _check_npz_path(path, "path")
    with np.load(path, allow_pickle=False) as npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            raise ValueError(
                f"path {str(path)!r} holds no FID statistics: expected arrays 'mu' and 'sigma', "
                f"found {sorted(npz.files)}"
            )
        mu, sigma = npz["mu"], npz["sigma"]
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise ValueError(f"path {str(path)!r}: mu/sigma must be floating point, got {mu.dtype}, {sigma.dtype}")
    return _check_stats(mu.astype(np.float64), sigma.astype(np.float64), f"path {str(path)!r}")


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _images_header(path: Path) -> tuple[int, ...]:
    """Shape of ``arr_0`` in ``path``, checked to be a C-ordered uint8 image array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{IMAGES_KEY}.npy") as f:
        shape, fortran_order, dtype = _read_npy_header(f)
    if dtype != np.uint8 or fortran_order or len(shape) not in (3, 4):
        raise ValueError(
            f"{str(path)!r}: arr_0 must be C-ordered uint8 images (N, H, W, 3), got dtype {dtype}, "
            f"shape {shape}{', Fortran order' if fortran_order else ''}"
        )
    return tuple(shape)


def iter_npz_images(path: str | os.PathLike, *, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 batches of ``arr_0`` (up to ``batch_size`` images each, layout as stored), streamed from the
    zip member so memory holds one batch, not the whole array."""
    path = Path(path)
    shape = _images_header(path)
    per_image = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as archive, archive.open(f"{IMAGES_KEY}.npy") as f:
        _read_npy_header(f)
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise ValueError(f"{str(path)!r}: arr_0 is truncated after {start} images")
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def read_images_npz(path: str | os.PathLike) -> np.ndarray:
    """All of ``arr_0`` as a uint8 array (N, H, W, 3) (small sets; ``iter_npz_images`` streams)."""
    path = _check_npz_path(path, "path")
    if IMAGES_KEY not in _npz_keys(path):
        raise ValueError(f"path {str(path)!r} holds no images: expected array 'arr_0', found {_npz_keys(path)}")
    _images_header(path)
    with np.load(path, allow_pickle=False) as npz:
        return npz[IMAGES_KEY]


# ----------------------------------------------------------------------------------------------------
# Image folders


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, following links), sorted; hidden entries skipped."""
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / name
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)
        ]
    return sorted(found)


def _load_folder_image(path: Path, image_size: int | None) -> np.ndarray:
    try:
        image = load_image(path)
    except (OSError, SyntaxError, ValueError) as err:
        # One unreadable image would silently change the set being measured; stop and say which.
        raise ValueError(f"unreadable image {str(path)!r} ({type(err).__name__}: {err})") from None
    if image_size is not None:
        image = center_crop(image, image_size)
    return np.asarray(image, dtype=np.uint8)  # (H, W, 3)


def iter_folder_images(
    files: list[Path], *, image_size: int | None, batch_size: int
) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of ``files``, center-cropped to ``image_size`` when given; without it
    all images must already share one size."""
    first_shape = None
    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = list(pool.map(lambda p: _load_folder_image(p, image_size), chunk))
            for path, image in zip(chunk, images):
                first_shape = first_shape or image.shape
                if image.shape != first_shape:
                    raise ValueError(
                        f"images differ in size ({str(files[0])!r} is {first_shape[1]}x{first_shape[0]}, "
                        f"{str(path)!r} is {image.shape[1]}x{image.shape[0]}); pass image_size "
                        "(CLI: --image-size) to center-crop them all to one resolution"
                    )
            yield np.stack(images)


# ----------------------------------------------------------------------------------------------------
# One set, whatever form it comes in


@dataclass
class ImageSet:
    """One side of a comparison: images (in memory, a folder or an npz), statistics, or both."""

    name: str  # "samples" / "reference", for messages
    description: str
    images: np.ndarray | torch.Tensor | None = None  # in memory
    files: list[Path] | None = None  # a folder's images
    npz_path: Path | None = None  # an npz holding arr_0
    num_images: int | None = None  # None when there are no images
    stats: tuple[np.ndarray, np.ndarray] | None = None  # stored mu, sigma
    fingerprint: dict | None = None  # what the feature cache key hashes; None: not cacheable

    @property
    def has_images(self) -> bool:
        return self.num_images is not None

    def batches(self, *, batch_size: int, image_size: int | None) -> Iterator:
        """uint8 image batches; ``image_size`` applies to folders only."""
        if self.files is not None:
            return iter_folder_images(self.files, image_size=image_size, batch_size=batch_size)
        if self.npz_path is not None:
            return iter_npz_images(self.npz_path, batch_size=batch_size)
        if self.images is not None:
            return (self.images[i : i + batch_size] for i in range(0, len(self.images), batch_size))
        raise ValueError(f"{self.name} ({self.description}) holds only statistics, no images")


def open_image_set(source, *, name: str) -> ImageSet:
    """Resolve ``source`` (a folder, an ``.npz``, a uint8 array/tensor, or a ``(mu, sigma)`` tuple)
    without reading any image."""
    if isinstance(source, tuple) and len(source) == 2:
        mu, sigma = (np.asarray(a, dtype=np.float64) for a in source)
        return ImageSet(name, "mu/sigma in memory", stats=_check_stats(mu, sigma, name))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        images = as_uint8_nchw(source)  # validates dtype and layout now, not halfway through
        if len(images) == 0:
            raise ValueError(f"{name} holds no images")
        return ImageSet(name, f"{len(images)} images in memory", images=images, num_images=len(images))
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"{name} must be an image folder, an .npz file, a uint8 array or a (mu, sigma) tuple, "
            f"got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise ValueError(f"{name} {str(path)!r} holds no images with extensions {list(IMG_EXTENSIONS)}")
        root = path.resolve()
        listing = [[str(f.relative_to(path)), *_size_mtime(f)] for f in files]
        fingerprint = {"kind": "folder", "path": str(root), "files": listing}
        return ImageSet(name, f"folder {str(path)!r}", files=files, num_images=len(files), fingerprint=fingerprint)
    if not path.exists():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist (expected an image folder or an .npz)")
    path = _check_npz_path(path, name)
    keys = _npz_keys(path)
    has_stats = "mu" in keys and "sigma" in keys
    if IMAGES_KEY not in keys and not has_stats:
        raise ValueError(
            f"{name} {str(path)!r} holds neither images ('arr_0') nor FID statistics ('mu' and 'sigma'); "
            f"found {sorted(keys)}"
        )
    image_set = ImageSet(name, f"npz {str(path)!r}")
    if has_stats:
        image_set.stats = read_stats_npz(path)
    if IMAGES_KEY in keys:
        image_set.npz_path = path
        image_set.num_images = _images_header(path)[0]
        if image_set.num_images == 0:
            raise ValueError(f"{name} {str(path)!r}: arr_0 holds no images")
        image_set.fingerprint = {"kind": "npz", "path": str(path.resolve()), "stat": _size_mtime(path)}
    return image_set


def _size_mtime(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


# ----------------------------------------------------------------------------------------------------
# Features, with the cache


def cache_key(image_set: ImageSet, network: FeatureNetwork, *, image_size: int | None) -> str:
    """Hex key of ``image_set``'s features under ``network`` (and ``image_size``, for folders, the only
    sets it changes); raises for sets without a fingerprint."""
    if image_set.fingerprint is None:
        raise ValueError(f"{image_set.name} ({image_set.description}) has no stable identity to cache under")
    key = {
        "version": CACHE_VERSION,
        "network": network.identity,
        "set": image_set.fingerprint,
        "image_size": image_size if image_set.files is not None else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _cache_file(image_set: ImageSet, network: FeatureNetwork, cache_dir, image_size: int | None) -> Path | None:
    if cache_dir is None or image_set.fingerprint is None:
        return None
    return Path(cache_dir).expanduser() / f"{cache_key(image_set, network, image_size=image_size)}.npz"


def load_cached_features(
    image_set: ImageSet, network: FeatureNetwork, cache_dir, *, image_size: int | None
) -> np.ndarray | None:
    """float64 (N, 2048) features of ``image_set`` from ``cache_dir``, or None when not cached (or the
    entry does not fit the set, which then gets recomputed and overwritten rather than trusted)."""
    cache_file = _cache_file(image_set, network, cache_dir, image_size)
    if cache_file is None or not cache_file.is_file():
        return None
    with np.load(cache_file, allow_pickle=False) as npz:
        features = npz["features"].astype(np.float64)
    if features.ndim != 2 or len(features) != image_set.num_images or not np.isfinite(features).all():
        return None
    return features


def store_cached_features(
    image_set: ImageSet, network: FeatureNetwork, cache_dir, features: np.ndarray, *, image_size: int | None
) -> None:
    """Save ``features`` of ``image_set`` in ``cache_dir`` (nothing for sets without a fingerprint)."""
    cache_file = _cache_file(image_set, network, cache_dir, image_size)
    if cache_file is None:
        return
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # float32 halves the file and is exact for float32 networks; keep float64 if it would round.
    stored = features.astype(np.float32)
    stored = stored if np.array_equal(stored, features) else features
    description = np.array(f"{image_set.description} | {network.identity} | image_size={image_size}")
    atomic_write(cache_file, lambda tmp: _savez(tmp, features=stored, description=description))


def image_set_features(
    image_set: ImageSet,
    network: FeatureNetwork,
    *,
    image_size: int | None = None,
    batch_size: int = 50,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """float64 (N, 2048) Inception features of ``image_set``; read from / written to ``cache_dir``
    (None: no cache) for sets with a fingerprint (those on disk; in-memory arrays have none)."""
    if not image_set.has_images:
        raise ValueError(f"{image_set.name} ({image_set.description}) holds only statistics, no images")
    features = load_cached_features(image_set, network, cache_dir, image_size=image_size)
    if features is not None:
        return features
    features = network.run(
        image_set.batches(batch_size=batch_size, image_size=image_size),
        total=image_set.num_images,
        progress=progress,
    )
    if len(features) != image_set.num_images:
        raise ValueError(f"{image_set.name}: got {len(features)} features for {image_set.num_images} images")
    store_cached_features(image_set, network, cache_dir, features, image_size=image_size)
    return features
