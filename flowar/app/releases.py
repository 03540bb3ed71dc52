"""The web demo's model side, free of UI code: the releases it serves, one request at a time on each, and the
checks that turn a page's controls into sampling options or into a message the page shows as it is."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from heads.solvers import ADAPTIVE_SOLVERS, SOLVERS
from vae.pyramid import parse_scale_list, scale_masks

from ..editing import box_mask
from ..outputs import decode_output, image_grid, png_with_settings
from ..registry import load_pipeline
from ..xar_config import XAR_SOLVERS

MAX_IMAGES = 64  # per request: a page is for looking at images, eval.sample is for making thousands
MAX_STEPS = 1000  # ODE steps per scale (xAR: per cell)
# The solvers the page offers to the families that integrate a flow, which take steps and a solver; the others
# (VAR, FlexVAR) take top-k and top-p.
FAMILY_SOLVERS = {"flowar": SOLVERS, "xar": XAR_SOLVERS}
NULL_CLASS = -1  # the class choice "no class" (the null class: in-painting without class information)

Progress = Callable[[float, str], None]


class RequestError(ValueError):
    """A request the page cannot run; the message names the control and what it allows."""


class Cancelled(Exception):
    """The request was stopped from the page between two scales (or while it waited for the model)."""


@dataclass
class Result:
    """The images of one request, the settings that made each one, and where the time went."""

    images: np.ndarray  # (B, H, W, 3) uint8
    settings: list[dict]  # one per image, written into its PNG
    sampling_seconds: float  # the generator, the library's own sampling
    decoding_seconds: float  # the autoencoder's decode

    @property
    def ms_per_image(self) -> float:
        return 1000 * (self.sampling_seconds + self.decoding_seconds) / len(self.images)

    def grid(self, nrow: int | None = None) -> Image.Image:
        count = len(self.images)
        return image_grid(self.images, nrow or min(count, 8))

    def pngs(self) -> list[bytes]:
        return [png_with_settings(image, settings) for image, settings in zip(self.images, self.settings)]

    def zip_bytes(self, stem: str) -> bytes:
        """The PNGs, settings in their metadata, as one zip (``stem``-000.png, ...)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for i, data in enumerate(self.pngs()):
                archive.writestr(f"{stem}-{i:03d}.png", data)
        return buffer.getvalue()


def check_int(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a RequestError naming the control."""
    if value is None or isinstance(value, bool):
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def parse_steps(text) -> int | tuple[int, ...]:
    """Steps per scale (xAR: per cell) from the page: one count ("20") or one per scale ("20,20,20,10")."""
    parts = [part.strip() for part in str(text).split(",")]
    counts = tuple(check_int(part, "steps", 1, MAX_STEPS) for part in parts)
    return counts[0] if len(counts) == 1 else counts


def check_float(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number from {low} to {high}, got {value!r}") from None
    if not low <= number <= high:
        raise RequestError(f"{name} must be a number from {low} to {high}, got {value!r}")
    return number


class Release:
    """One release folder, loaded once: its pipeline, its lock (one request at a time, so two users never
    share a KV cache or interleave their scales), and what the page offers for it."""

    def __init__(self, path, *, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                 compile: bool = False):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise RequestError(f"release folder {path} does not exist (give a folder that holds config.json, "
                               "model.safetensors and vae/ or tokenizer/)")
        try:
            self.pipeline = load_pipeline(path).to(device)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise RequestError(f"{path} is not a FlowAR, VAR, FlexVAR or xAR release folder: {err}") from None
        if compile:
            self.pipeline.compile()
        self.path, self.name = path, path.name
        self.autocast_dtype = autocast_dtype
        self.lock = threading.Lock()

    # -------------------------------------------------------------------------------------- what it offers
    @property
    def model(self):
        return self.pipeline.model

    @property
    def family(self) -> str:
        return self.model.model_type  # "flowar", "var", "flexvar" or "xar"

    @property
    def solvers(self) -> tuple[str, ...]:
        """The solvers the page offers; empty for a family without steps and a solver (VAR, FlexVAR)."""
        return FAMILY_SOLVERS.get(self.family, ())

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def side(self) -> int:
        """The images' side in pixels."""
        return self.model.latent_side * self.pipeline.autoencoder.downsample

    @property
    def defaults(self):
        """The release's saved sampling options (guidance of an unconditional model is 1)."""
        return self.model.sampling_options()

    def class_choices(self, *, with_null: bool = False) -> list[tuple[str, int]]:
        """(label, id) per class: "id: name" where the release has names, the id otherwise; empty for an
        unconditional model. with_null adds "no class" (the null class) first."""
        if self.num_classes == 0:
            return []
        names = self.pipeline.class_names
        choices = [(f"{i}: {names[i]}" if names else str(i), i) for i in range(self.num_classes)]
        return ([("no class (null)", NULL_CLASS)] if with_null else []) + choices

    def describe(self) -> str:
        c = self.model.config
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        kind = "unconditional" if c.num_classes == 0 else f"{c.num_classes} classes"
        steps = (f"{c.num_cells} cells of {c.cell_side}x{c.cell_side} tokens" if self.family == "xar"
                 else f"scales {list(c.scales)}")
        return f"{self.name}: {self.family}, {params:.1f}M parameters, {kind}, {self.side}x{self.side} px, {steps}"

    # -------------------------------------------------------------------------------------- checks
    @property
    def samples_any_scales(self) -> bool:
        """Whether the release samples other lists of sides than its own (FlexVAR, a flexible FlowAR)."""
        return bool(getattr(self.model.config, "samples_any_scales", False))

    def sampling(self, *, guidance_scale=None, steps=None, solver=None, top_k=None, top_p=None, scales=None):
        """The validated sampling options from the page's controls (None: the release's default). A control of
        the other family is ignored: the page hides it. scales: the sides to sample, "1,2,4,8,12" or "1,2,4,8x12"
        (empty: the release's own), for a release that samples any list."""
        overrides = {}
        if scales is not None and str(scales).strip():
            if not self.samples_any_scales:
                raise RequestError(f"{self.name} samples only its own scales {list(self.model.config.scales)}")
            try:
                overrides["scales"] = parse_scale_list(scales)
            except ValueError as err:
                raise RequestError(str(err)) from None
        if guidance_scale is not None:
            overrides["guidance_scale"] = check_float(guidance_scale, "guidance scale", 1.0, 20.0)
        if self.solvers:
            if solver is not None:
                overrides["solver"] = solver
            # An adaptive solver picks its own steps: the options drop the count when it is not given.
            if steps is not None and str(steps).strip() and solver not in ADAPTIVE_SOLVERS:
                overrides["steps"] = parse_steps(steps)
        else:
            if top_k is not None:
                overrides["top_k"] = check_int(top_k, "top-k", 0, self.model.config.vocab_size)
            if top_p is not None:
                overrides["top_p"] = check_float(top_p, "top-p", 0.0, 1.0)
        if self.num_classes == 0 and overrides.get("guidance_scale", 1.0) != 1.0:
            raise RequestError(f"{self.name} is unconditional: guidance scale must be 1")
        try:
            options = self.model.sampling_options(**overrides)
        except ValueError as err:
            raise RequestError(f"{self.name}: {err}") from None
        return options

    def class_label(self, choice) -> int | None:
        """The page's class choice as a label: None for an unconditional model or "no class"."""
        if self.num_classes == 0:
            return None
        if choice is None or choice == "":
            raise RequestError(f"choose a class (0 to {self.num_classes - 1}) for {self.name}")
        label = check_int(choice, "class", NULL_CLASS, self.num_classes - 1)
        return None if label == NULL_CLASS else label

    # -------------------------------------------------------------------------------------- requests
    def generate(self, class_choice, num_images, seed, options, *, cancel: threading.Event | None = None,
                 progress: Progress | None = None) -> Result:
        """``num_images`` images of one class (or unconditional), from one generator seeded with ``seed``."""
        count = check_int(num_images, "number of images", 1, MAX_IMAGES)
        seed = check_int(seed, "seed", 0, 2**63 - 1)
        label = self.class_label(class_choice)
        if label is None and self.num_classes:
            raise RequestError("Generate needs a class; \"no class\" is for editing")

        def sample(on_scale, generator):
            labels = None if label is None else [label] * count
            return self.pipeline(labels, batch_size=count if labels is None else None, sampling=options,
                                 generator=generator, output_type="sample", on_scale=on_scale,
                                 autocast_dtype=self.autocast_dtype)

        return self._run(sample, seed, self._settings("generate", label, seed, count, options), cancel, progress)

    def edit(self, image: Image.Image, regenerate: np.ndarray, class_choice, num_images, seed, options, *,
             task: str = "inpaint", cancel: threading.Event | None = None, progress: Progress | None = None) -> Result:
        """Regenerate the region of ``image`` where ``regenerate`` (H, W bool) is True, keeping the rest, in
        ``num_images`` variants; class_choice "no class" is the authors' in-painting without class information."""
        count = check_int(num_images, "number of images", 1, MAX_IMAGES)
        seed = check_int(seed, "seed", 0, 2**63 - 1)
        label = self.class_label(class_choice)
        images = np.repeat(check_image(image, self.side, self.name)[None], count, axis=0)
        keep = self.check_mask(regenerate)

        def sample(on_scale, generator):
            return self.pipeline.inpaint(images, keep, label, generator=generator, output_type="sample",
                                         sampling=options, on_scale=on_scale, autocast_dtype=self.autocast_dtype)

        return self._run(sample, seed, self._settings(task, label, seed, count, options), cancel, progress)

    def check_mask(self, regenerate) -> torch.Tensor:
        """The keep mask (1 keeps the image) of a painted region, refused where it keeps all or nothing."""
        regenerate = np.asarray(regenerate, dtype=bool)
        if regenerate.shape != (self.side, self.side):
            raise RequestError(f"the mask must be {self.side}x{self.side}, got {regenerate.shape[1]}x{regenerate.shape[0]}")
        if not regenerate.any():
            raise RequestError("the mask keeps the whole image: paint the region to regenerate")
        if regenerate.all():
            raise RequestError("the mask keeps nothing of the image: paint only the region to regenerate "
                               "(for a new image, use Generate)")
        keep = torch.from_numpy(~regenerate).float()
        # The latent the sample decodes from, kept whole: nothing would be regenerated.
        if bool(scale_masks(keep[None, None], (self.model.latent_side,))[0].all()):
            cell = self.pipeline.autoencoder.downsample
            raise RequestError(f"the painted region covers no whole latent cell ({cell}x{cell} px): paint a "
                               "larger region")
        return keep

    def _settings(self, task: str, label: int | None, seed: int, count: int, options) -> list[dict]:
        names = self.pipeline.class_names
        base = {"task": task, "release": str(self.path), "family": self.family, "class_id": label,
                "class_name": names[label] if names and label is not None else None, "seed": seed,
                "num_images": count, "sampling": options.to_dict()}
        return [{**base, "index": i} for i in range(count)]

    def _run(self, sample, seed: int, settings: list[dict], cancel, progress) -> Result:
        """Hold the model's lock, sample with a per-scale hook (progress, cancellation), decode, time both."""
        cancel = cancel or threading.Event()
        report = progress or (lambda fraction, text: None)
        report(0.0, f"waiting for {self.name} (one request at a time)")
        while not self.lock.acquire(timeout=0.1):
            if cancel.is_set():
                raise Cancelled("stopped while waiting for the model")
        try:
            if cancel.is_set():
                raise Cancelled("stopped before sampling")

            def on_scale(k: int, n: int) -> None:
                report((k + 1) / (n + 1), f"scale {k + 1} of {n}")
                if cancel.is_set():
                    raise Cancelled(f"stopped after scale {k + 1} of {n}")

            generator = torch.Generator(self.pipeline.device).manual_seed(seed)
            start = time.perf_counter()
            latent = sample(on_scale, generator)
            synchronize(self.pipeline.device)
            sampled = time.perf_counter()
            report(len(self.model.config.scales) / (len(self.model.config.scales) + 1), "decoding")
            images = decode_output(self.pipeline.autoencoder, latent, "np")
            synchronize(self.pipeline.device)
            decoded = time.perf_counter()
        finally:
            self.lock.release()
        return Result(images, settings, sampled - start, decoded - sampled)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_image(image, side: int, release: str) -> np.ndarray:
    """An uploaded image as (side, side, 3) uint8, or a RequestError saying what size and modes are allowed."""
    if not isinstance(image, Image.Image):
        raise RequestError("upload an image to edit")
    if image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if (alpha < 255).any():
            raise RequestError("the image has transparent pixels (mode RGBA); the allowed modes are RGB and L "
                               "(grayscale), or RGBA without transparency")
        image = image.convert("RGB")
    elif image.mode == "L":
        image = image.convert("RGB")
    elif image.mode != "RGB":
        raise RequestError(f"the image's mode is {image.mode}; the allowed modes are RGB and L (grayscale), or "
                           "RGBA without transparency")
    if image.size != (side, side):
        raise RequestError(f"the image is {image.size[0]}x{image.size[1]} pixels; {release} edits "
                           f"{side}x{side} images (tick \"fit to the model's size\" to crop and resize it)")
    return np.asarray(image, dtype=np.uint8)


def fit_image(image: Image.Image, side: int) -> Image.Image:
    """The largest centred square of ``image``, resized to side x side (its mode kept)."""
    width, height = image.size
    crop = min(width, height)
    left, top = (width - crop) // 2, (height - crop) // 2
    return image.crop((left, top, left + crop, top + crop)).resize((side, side), Image.Resampling.LANCZOS)


def outpaint_region(side: int, kept_fraction: float) -> np.ndarray:
    """(side, side) bool: True (regenerate) outside a centred square holding ``kept_fraction`` of the side."""
    kept = check_float(kept_fraction, "kept centre", 0.1, 0.95)
    margin = (1 - kept) / 2
    keep = box_mask(side, margin, margin, 1 - margin, 1 - margin, keep_inside=True)
    return keep.numpy() < 0.5


class Releases:
    """The releases a server holds, by name; more can be loaded while it serves."""

    def __init__(self, *, device="cpu", autocast_dtype=None, compile: bool = False):
        self.device, self.autocast_dtype, self.compile = device, autocast_dtype, compile
        self.by_name: dict[str, Release] = {}
        self._loading = threading.Lock()

    def load(self, path) -> Release:
        """Load ``path`` (once: a folder already loaded is returned as it is)."""
        with self._loading:
            for release in self.by_name.values():
                if release.path.resolve() == Path(path).expanduser().resolve():
                    return release
            release = Release(path, device=self.device, autocast_dtype=self.autocast_dtype, compile=self.compile)
            name, n = release.name, 2
            while name in self.by_name:  # two folders of one name (run-a/release, run-b/release)
                name, n = f"{release.name} ({n})", n + 1
            release.name = name
            self.by_name[name] = release
            return release

    def __getitem__(self, name) -> Release:
        if name not in self.by_name:
            raise RequestError(f"choose a model; loaded are {sorted(self.by_name)}")
        return self.by_name[name]

    @property
    def names(self) -> list[str]:
        return list(self.by_name)
