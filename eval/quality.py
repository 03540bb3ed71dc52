"""The demo's quality scorer: a small CNN trained on the real bundled MNIST digits.

It scores any set of digit samples (from FlowAR, VAR, a solver or a step count) by
  * class-consistency: the fraction of samples the classifier reads as the digit they were conditioned
    on (overall and per digit), and
  * the Frechet distance between the samples and the real training digits in the classifier's own
    128-dimensional feature space (the penultimate layer), the MNIST analogue of FID.

    python -m eval.quality SAMPLES.npz [--classifier DIR]       # arr_0 (N,H,W[,C]) uint8 + labels (N,)
    python -m eval.quality --pipeline RELEASE --per-class 100 [--guidance-scale 3 --steps 10 --solver euler]
    python -m eval.quality --write-reference mnist-train.npz    # the training digits, for eval.fid

The classifier trains on the 4,500 training digits of ``train.data.MNISTDataset`` and is measured on
the 500 held-out digits, which it never sees; a trained one is saved as a folder (config.json +
model.safetensors) and reused. The Frechet reference is the 4,500 training digits, the distribution the
generators were trained on; ``real_heldout_frechet`` (500 held-out real digits against it) is the floor
a perfect generator would reach at that sample size.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from flowar.cli import parse_step_counts
from vae.files import atomic_write
from train.data import MNISTDataset

from .metrics import feature_statistics, frechet_distance
from .reference import default_cache_dir

IMAGE_SIZE = 32
FEATURE_DIM = 128
NUM_DIGITS = 10


class DigitClassifier(nn.Module):
    """Two conv stages (16, 32 channels, batch-normed) and a 128-wide feature layer: 32x32 grey -> 10 logits."""

    def __init__(self):
        super().__init__()

        def stage(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2),
            )

        self.stages = nn.Sequential(stage(1, 16), stage(16, 32))  # 32 -> 16 -> 8
        self.features = nn.Linear(32 * 8 * 8, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.logits = nn.Linear(FEATURE_DIM, NUM_DIGITS)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, 128) post-ReLU features."""
        return F.relu(self.features(self.stages(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, 10) logits."""
        return self.logits(self.dropout(self.embed(x)))


def to_classifier_input(images) -> torch.Tensor:
    """uint8 digits (N, H, W), (N, H, W, C) or (N, C, H, W) -> float (N, 1, 32, 32) in [-1, 1].

    Colour is averaged to grey (our MNIST VAE decodes RGB); other sizes are resized bicubically, as the
    training digits were resized from 28 to 32.
    """
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim == 4:
        channel_axis = 1 if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3) else 3
        array = array.astype(np.float32).mean(axis=channel_axis)
    elif array.ndim != 3:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {array.shape}")
    array = array.astype(np.float32)
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        array = np.stack([
            np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for im in array
        ])
    return torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(1).div(127.5).sub(1.0)


def _real_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits of ``split`` as (N, 1, 32, 32) in [-1, 1] and their labels."""
    data = MNISTDataset(image_size=IMAGE_SIZE, split=split)
    return data.images.float().div(127.5).sub(1.0).unsqueeze(1), data.labels.clone()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-digit random shifts (up to 2 px), rotations (up to 10 degrees) and scalings (0.9 to 1.1).

    Generated digits wobble in exactly these ways; flips and crops would change or cut the digit.
    """
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (10 * torch.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / IMAGE_SIZE)  # grid units: 2 / size per px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Background is -1 (black): sample the shifted image with -1 outside by offsetting around zero padding.
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of (N, 1, 32, 32) ``images`` classified as ``labels``."""
    return float((predict(classifier, images) == labels).float().mean())


@torch.no_grad()
def predict(classifier: DigitClassifier, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier(chunk).argmax(1) for chunk in images.split(batch_size)])


@torch.no_grad()
def embed(classifier: DigitClassifier, images: torch.Tensor, *, batch_size: int = 500) -> np.ndarray:
    """(N, 1, 32, 32) -> (N, 128) float64 features."""
    classifier.eval()
    return torch.cat([classifier.embed(chunk) for chunk in images.split(batch_size)]).double().numpy()


def train_digit_classifier(*, epochs: int = 12, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                           progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train on the 4,500 training digits; return the classifier and its held-out accuracy (500 digits)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)  # the initialisation
    generator = torch.Generator().manual_seed(seed)
    classifier = DigitClassifier()
    images, labels = _real_digits("train")
    steps_per_epoch = -(-len(images) // batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="digit classifier", disable=not progress)
    for _ in range(epochs):
        classifier.train()
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(classifier(_augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    heldout_images, heldout_labels = _real_digits("heldout")
    return classifier, accuracy(classifier, heldout_images, heldout_labels)


def save_classifier(classifier: DigitClassifier, folder, *, heldout_accuracy: float) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    info = json.dumps({"kind": "mnist-digit-classifier", "heldout_accuracy": heldout_accuracy}, indent=2)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(info))


def load_classifier(folder) -> tuple[DigitClassifier, float]:
    """A saved classifier and the held-out accuracy it was saved with."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"classifier {str(folder)!r} has no config.json + model.safetensors")
    info = json.loads((folder / "config.json").read_text())
    if info.get("kind") != "mnist-digit-classifier":
        raise ValueError(f"classifier {str(folder)!r} is not a saved digit classifier (kind {info.get('kind')!r})")
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(folder / "model.safetensors"))
    return classifier.eval(), float(info["heldout_accuracy"])


# train_digit_classifier's defaults give one classifier per machine, so it is trained once (about 25 s on two
# cores) and kept in the cache folder beside eval.reference's features; every demo run, rescore, sweep and
# eval.quality call then scores with the same network. Raise the version when the recipe or the network
# changes, so that a classifier of the old recipe is not reused.
CLASSIFIER_VERSION = 1


def shared_classifier_dir() -> Path:
    """``$XDG_CACHE_HOME/flowar/digit-classifier-v<CLASSIFIER_VERSION>`` (``~/.cache`` when unset)."""
    return default_cache_dir().parent / f"digit-classifier-v{CLASSIFIER_VERSION}"


def load_or_train_classifier(folder=None, *, progress: bool = True) -> tuple[DigitClassifier, float]:
    """The classifier saved in ``folder``; else the shared one (:func:`shared_classifier_dir`, trained and saved
    there the first time), copied into ``folder`` when one is given."""
    if folder is not None and (Path(folder) / "model.safetensors").is_file():
        return load_classifier(folder)
    shared = shared_classifier_dir()
    if (shared / "model.safetensors").is_file():
        classifier, heldout_accuracy = load_classifier(shared)
    else:
        classifier, heldout_accuracy = train_digit_classifier(progress=progress)
        save_classifier(classifier, shared, heldout_accuracy=heldout_accuracy)
    if folder is not None:
        save_classifier(classifier, folder, heldout_accuracy=heldout_accuracy)
    return classifier.eval(), heldout_accuracy


@dataclass
class QualityReport:
    """How a set of class-conditional digit samples scores under the classifier."""

    num_samples: int
    class_consistency: float  # fraction read as the conditioning digit
    per_digit: list[float]  # the same per digit 0..9 (nan for a digit with no samples)
    frechet_distance: float  # to the 4,500 training digits, in the classifier's feature space
    real_heldout_frechet: float  # the same for the 500 real held-out digits: the floor at that size
    classifier_heldout_accuracy: float

    def summary(self) -> str:
        digits = " ".join(f"{d}:{v:.0%}" for d, v in enumerate(self.per_digit))
        return (f"class-consistency {self.class_consistency:.1%} over {self.num_samples} samples ({digits}); "
                f"Frechet distance {self.frechet_distance:.2f} (real held-out digits: {self.real_heldout_frechet:.2f}); "
                f"classifier held-out accuracy {self.classifier_heldout_accuracy:.1%}")


class DigitScorer:
    """A trained classifier with the feature statistics of the real digits, ready to score samples."""

    def __init__(self, classifier: DigitClassifier, heldout_accuracy: float):
        self.classifier = classifier.eval()
        self.heldout_accuracy = heldout_accuracy
        train_images, _ = _real_digits("train")
        self.reference = feature_statistics(embed(self.classifier, train_images))
        heldout_images, _ = _real_digits("heldout")
        self.real_heldout_frechet = frechet_distance(*feature_statistics(embed(self.classifier, heldout_images)),
                                                     *self.reference)

    @classmethod
    def load_or_train(cls, folder=None, *, progress: bool = True) -> "DigitScorer":
        return cls(*load_or_train_classifier(folder, progress=progress))

    def score(self, images, labels) -> QualityReport:
        """Score uint8 digit ``images`` (see ``to_classifier_input``) conditioned on ``labels`` (N,)."""
        inputs = to_classifier_input(images)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if labels.numel() != inputs.shape[0]:
            raise ValueError(f"labels must have one entry per image ({inputs.shape[0]}), got {labels.numel()}")
        if inputs.shape[0] < 2:
            raise ValueError(f"images must hold at least 2 samples for a Frechet distance, got {inputs.shape[0]}")
        if labels.min() < 0 or labels.max() >= NUM_DIGITS:
            raise ValueError(f"labels must be digits 0..9, got values in [{int(labels.min())}, {int(labels.max())}]")
        correct = predict(self.classifier, inputs) == labels
        per_digit = [float(correct[labels == d].float().mean()) if (labels == d).any() else float("nan")
                     for d in range(NUM_DIGITS)]
        distance = frechet_distance(*feature_statistics(embed(self.classifier, inputs)), *self.reference)
        return QualityReport(
            num_samples=int(labels.numel()), class_consistency=float(correct.float().mean()), per_digit=per_digit,
            frechet_distance=float(distance), real_heldout_frechet=float(self.real_heldout_frechet),
            classifier_heldout_accuracy=self.heldout_accuracy,
        )


def sample_digits(pipeline, *, per_class: int, batch_size: int = 100, seed: int = 0, **sample_kwargs):
    """``per_class`` samples of each digit from a class-conditional pipeline: uint8 images and labels."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = [digit for digit in range(NUM_DIGITS) for _ in range(per_class)]
    generator = torch.Generator().manual_seed(seed)
    images = [pipeline(labels[i:i + batch_size], output_type="np", generator=generator, **sample_kwargs)
              for i in tqdm(range(0, len(labels), batch_size), desc="sampling digits")]
    return np.concatenate(images), np.asarray(labels)


def write_reference(path, *, image_size: int = 32) -> None:
    """The training digits as an ADM images npz (``arr_0`` (N, S, S, 3) uint8, ``labels``): the reference
    set the demo's generators are measured against with ``eval.fid``."""
    digits = MNISTDataset(image_size=image_size, split="train")
    images = np.repeat(digits.images.numpy()[..., None], 3, axis=-1)
    labels = digits.labels.numpy().astype(np.int64)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez appends ".npz" to a bare name
            np.savez(f, arr_0=images, labels=labels)

    atomic_write(Path(path), write)


def training_digits_reference(cache_dir=None) -> Path:
    """The training digits as :func:`write_reference` writes them, at 32 px, in ``cache_dir`` (default: the
    feature cache folder of ``eval.reference``), written the first time only. The demo's FID and ``eval.sweep
    --digits`` both measure against this one file, so its Inception features, which take about ten minutes on
    a 2-core CPU, are computed once and then read from the feature cache."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "mnist-train-32.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_reference(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="npz with arr_0 (uint8 images) and labels")
    p.add_argument("--pipeline", help="a release folder to sample from instead")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--guidance-scale", type=float, help="1 = unguided (default: the release's)")
    p.add_argument("--var-cfg", type=float, help="VAR releases: guidance in VAR's own convention, 0 = unguided")
    p.add_argument("--steps", type=parse_step_counts,
                   help="FlowAR releases: ODE steps or flow-map jumps, one count or one per scale (20,20,20,10)")
    p.add_argument("--solver", help="FlowAR releases: the ODE solver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default=os.path.join("runs", "digit-classifier"),
                   help="folder of a saved classifier; when absent, the machine's shared one is copied there "
                        "(trained the first time)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--write-reference", metavar="NPZ",
                   help="write the 4,500 training digits (32 px, arr_0 + labels) as eval.fid's reference, and stop")
    args = p.parse_args(argv)
    if args.write_reference:
        write_reference(args.write_reference)
        print(f"wrote the {len(MNISTDataset(image_size=32, split='train'))} training digits to {args.write_reference}")
        return 0
    if (args.samples is None) == (args.pipeline is None):
        p.error("give either SAMPLES.npz or --pipeline")
    scorer = DigitScorer.load_or_train(args.classifier)
    if args.pipeline:
        from flowar import load_pipeline

        pipe = load_pipeline(args.pipeline)
        options = dict(guidance_scale=args.guidance_scale, var_cfg=args.var_cfg, steps=args.steps, solver=args.solver)
        try:  # an option of the other family is refused by the model's options dataclass, naming it
            options = pipe.model.sampling_options(**options)
        except ValueError as err:
            p.error(str(err))
        images, labels = sample_digits(pipe, per_class=args.per_class, seed=args.seed, sampling=options)
    else:
        with np.load(args.samples, allow_pickle=False) as data:
            if "arr_0" not in data or "labels" not in data:
                raise ValueError(f"samples {args.samples!r} must hold arr_0 and labels, has {sorted(data.files)}")
            images, labels = data["arr_0"], data["labels"]
    report = scorer.score(images, labels)
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
