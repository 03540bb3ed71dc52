"""Sample an evaluation set (50 per class by default) to PNGs and/or one ADM-style ``.npz``.

    python -m eval.sample PIPELINE_DIR --out samples/flowar-s --cfg 4 --steps 25
    torchrun --nproc_per_node 8 -m eval.sample PIPELINE_DIR --out samples/flowar-s --format npz

Works for FlowAR and VAR pipeline folders. The sample list is fixed up front: sample ``i`` has label
``i // per_class`` (class-major) and its own randomness, drawn from a ``torch.Generator`` seeded from
``(seed, i)`` (the model's ``noise_from_seeds``: FlowAR's initial noise, or for VAR one uniform per token,
from which the token is drawn by inverse CDF). The list is cut into chunks of
``--batch-size`` consecutive samples and ranks share the chunks round-robin, so with a fixed batch size
the images are bit-identical however many processes run them and however often the run is resumed.
A different batch size gives the same images up to float rounding (batched matmuls round differently),
which after quantisation is at most a level or so at a few pixels.

Layout of ``--out``:
    run.json      the arguments that define the samples; a rerun resumes only if they match
    labels.npy    (N,) int64 label of each sample, in index order (conditional models)
    images/       000000.png, 000001.png, ...: one PNG per sample, named by its global index
    samples.npz   ``arr_0`` (N, H, W, 3) uint8 and ``labels`` (N,) int64 (the ADM evaluator's input)

Rerunning the same command resumes: each chunk with a missing PNG is sampled again (whole, so that its
images do not depend on which of them survived) and only the missing PNGs are written. Every file is
written to a temporary name and renamed, so a killed run never leaves a half-written PNG under a final
name. With ``--format npz`` the PNGs are still written, as the resumable intermediate, and deleted once
``samples.npz`` is complete. (Per-rank ``.npz`` shards were the alternative; they cannot be appended to
without rewriting them, they tie the resume unit to one rank count, and a lossless PNG per sample
makes "what is done" a directory listing that any number of ranks can read.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from flowar.cli import FLOW_SOLVERS, parse_scales, parse_step_counts
from flowar.outputs import PRECISIONS
from flowar.registry import load_pipeline as load_any_pipeline
from flowar.sampling import CFG_SCHEDULES
from heads.solvers import SCHEDULES
from vae.files import atomic_write

FORMATS = ("png", "npz", "both")
DEFAULT_PER_CLASS = 50
RUN_FILE, LABELS_FILE, NPZ_FILE, IMAGES_DIR = "run.json", "labels.npy", "samples.npz", "images"
# run.json holds the arguments that define the samples, and a resume must match every one of them. The
# batch size (also recorded), device, number of processes and output format do not change which images
# are made, so they may differ.
NOT_SAMPLE_DEFINING = ("batch_size",)
NOISE_SCHEME = "torch.Generator per sample, seed (key(seed) + i) mod 2**32, the model's noise_from_seeds"
PNG_NAME = re.compile(r"(\d+)\.png")


class SimulatedKill(RuntimeError):
    """Raised by the test hook ``stop_after``: the run stops as if killed, leaving what it wrote."""


def load_pipeline(path, *, device: torch.device | str = "cpu"):
    """The pipeline (FlowAR or VAR) saved in folder ``path``, on ``device``."""
    return load_any_pipeline(path).to(device)


def sample_seeds(seed: int, indices) -> list[int]:
    """The generator seed of each global sample index.

    torch's CPU generator keeps only the low 32 bits of its seed, so seeds from a hash of (seed, i)
    would collide (for 50,000 samples, with probability ~0.25). ``(key + i) mod 2**32`` is distinct for
    every index of a run, and the key, hashed from ``seed``, keeps runs with nearby seeds apart.
    """
    key = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    return [(key + int(i)) % 2**32 for i in indices]


def sample_labels(num_classes: int, per_class: int) -> np.ndarray:
    """(N,) int64, class-major: per_class samples of class 0, then of class 1, ..."""
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def png_path(images: Path, index: int, total: int) -> Path:
    return images / f"{index:0{max(6, len(str(total - 1)))}d}.png"


def existing_indices(images: Path, total: int) -> set[int]:
    """Global indices whose PNG is in place (temporary files never match the final name pattern)."""
    if not images.is_dir():
        return set()
    found = set()
    for entry in os.scandir(images):
        match = PNG_NAME.fullmatch(entry.name)
        if match and int(match.group(1)) < total:
            found.add(int(match.group(1)))
    return found


def write_npz(path: Path, files: list[Path], labels: np.ndarray | None) -> None:
    """``arr_0`` (N, H, W, 3) uint8 from ``files`` in order (+ ``labels``), streamed: one image in memory.

    np.savez would need the whole (N, H, W, 3) array in memory (about 10 GB for 50,000 256px images);
    this writes the same zip of .npy members, reading one PNG at a time.
    """
    first = read_png(files[0])
    shape = (len(files), *first.shape)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": shape})
                for file in files:
                    image = read_png(file)
                    if image.shape != first.shape:
                        raise ValueError(f"{file} is {image.shape}, the first image is {first.shape}")
                    f.write(image.tobytes())
            if labels is not None:
                with zf.open("labels.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))

    atomic_write(path, write)


def read_png(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as err:  # only a crash of the machine itself can leave one (files are fsynced)
        raise ValueError(f"{file} is not a readable PNG ({err}); delete it and rerun to resample it") from None


# ---------------------------------------------------------------------------------------------- setup
def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when started by torchrun."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":  # one GPU per process, whatever index --device named
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(value: int, device: torch.device) -> int:
    """Sum of ``value`` over ranks (and a barrier); ``value`` itself in a single process."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def check_options(*, per_class, num_samples, num_classes, batch_size, seed, format, precision) -> None:
    """The checks that need no model, so that a bad command fails before anything loads (the sampling options
    are checked by the model's options dataclass, as soon as the model is known)."""
    for name, value in (("--per-class", per_class), ("--num-samples", num_samples),
                        ("--num-classes", num_classes), ("--batch-size", batch_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if per_class is not None and num_samples is not None:
        raise ValueError("give --per-class (conditional models) or --num-samples (unconditional), not both")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    for name, value, allowed in (("--format", format, FORMATS), ("--precision", precision, tuple(PRECISIONS))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def describe_run(pipe, path, *, per_class, num_samples, num_classes, seed, precision, **options) -> dict:
    """run.json: the resolved sample-defining arguments, the sampling options with the model's defaults filled
    in (its options dataclass, as the release's config.json holds it)."""
    model = pipe.model
    config = model.config
    sampling = model.sampling_options(**options)
    if config.unconditional:
        if num_samples is None:
            raise ValueError("the model is unconditional: give --num-samples (the total number of images)")
        if num_classes is not None:
            raise ValueError(f"--num-classes is for conditional models; this one is unconditional, got {num_classes}")
    else:
        if num_samples is not None:
            raise ValueError("--num-samples is for unconditional models; use --per-class (and --num-classes)")
        per_class = DEFAULT_PER_CLASS if per_class is None else per_class
        num_classes = config.num_classes if num_classes is None else num_classes
        if num_classes > config.num_classes:
            raise ValueError(f"--num-classes must be at most the model's {config.num_classes}, got {num_classes}")
        num_samples = num_classes * per_class
    record = {
        "pipeline": str(Path(path).resolve()),
        "model_type": model.model_type,
        "model": config.to_dict(),
        "num_samples": num_samples,
        "num_classes": None if config.unconditional else num_classes,
        "per_class": None if config.unconditional else per_class,
        "sampling": sampling.to_dict(),
        "seed": seed,
        "precision": precision,
        "noise": NOISE_SCHEME,
    }
    return json.loads(json.dumps(record))  # as run.json will read back (tuples become lists)


def sampling_of(pipe, record: dict):
    """The pipeline's sampling options from a run record."""
    return pipe.model.sampling_class.from_dict(record["sampling"])


def check_resume(out: Path, record: dict) -> bool:
    """True when ``out`` holds a run with the same samples, False when it is new; ValueError otherwise."""
    run_file = out / RUN_FILE
    if not run_file.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no {RUN_FILE}; give an empty or new folder")
        return False
    saved = json.loads(run_file.read_text())
    keys = sorted((set(saved) | set(record)) - set(NOT_SAMPLE_DEFINING))
    differ = [key for key in keys if saved.get(key) != record.get(key)]
    if differ:
        lines = [f"  {key}: {saved.get(key)!r} in the run, {record[key]!r} now" for key in differ]
        raise ValueError(f"--out {out} holds a run with different arguments, so it cannot be resumed:\n"
                         + "\n".join(lines) + "\nuse another --out, or the run's arguments")
    return True


# ---------------------------------------------------------------------------------------------- run
def run(pipeline, out, *, per_class: int | None = None, num_samples: int | None = None,
        num_classes: int | None = None, batch_size: int = 32, seed: int = 0, format: str = "both",
        precision: str = "fp32", device: str | None = None, progress: bool = True, stop_after: int | None = None,
        compiled: bool = False, **sampling) -> Path:
    """Sample the evaluation set of the pipeline folder ``pipeline`` into ``out`` (see the module doc).

    sampling: overrides of the model's sampling options (fields of ``FlowARSampling`` / ``VARSampling``, e.g.
    guidance_scale (1 = unguided), steps, top_k, or VAR's var_cfg; None: the model's saved default).
    compiled: torch.compile the generator's hot modules first (``FlowARPipeline.compile``); the images equal the
    eager ones up to float rounding. Returns ``out``. ``stop_after`` is a test hook: raise
    :class:`SimulatedKill` once this process has written that many PNGs.
    """
    sizes = dict(per_class=per_class, num_samples=num_samples, num_classes=num_classes, seed=seed, precision=precision)
    check_options(batch_size=batch_size, format=format, **sizes)
    out = Path(out)
    rank, world, device = init_distributed(device)
    pipe = load_pipeline(pipeline, device=device)
    if compiled:
        pipe.compile()
    record = describe_run(pipe, pipeline, **sizes, **sampling)
    total = record["num_samples"]
    labels = None if record["per_class"] is None else sample_labels(record["num_classes"], record["per_class"])
    images_dir = out / IMAGES_DIR

    # Every rank inspects the folder before rank 0 changes anything in it, so all agree on its state.
    resuming = check_resume(out, record)
    all_sum(0, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        images_dir.mkdir(exist_ok=True)
        if not resuming:
            atomic_write(out / RUN_FILE, lambda tmp: tmp.write_text(
                json.dumps({**record, "batch_size": batch_size}, indent=2) + "\n"))
            if labels is not None:
                atomic_write(out / LABELS_FILE, lambda tmp: _save_npy(tmp, labels))
        else:
            first = json.loads((out / RUN_FILE).read_text()).get("batch_size")
            if first != batch_size:
                print(f"eval.sample: resuming with --batch-size {batch_size} (the run began with {first}): "
                      "the new images equal what the first would have given only up to float rounding",
                      file=sys.stderr)
        for folder in (out, images_dir):  # temporary files of a killed run
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    os.unlink(entry.path)
    all_sum(0, device)

    complete = format == "npz" and (out / NPZ_FILE).is_file()  # an npz-only run that already finished
    done = set(range(total)) if complete else existing_indices(images_dir, total)
    chunks = [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    todo = [chunk for chunk in chunks if any(i not in done for i in chunk)]
    mine = todo[rank::world]
    all_sum(0, device)  # everyone has listed the folder before anyone writes to it

    autocast_dtype = PRECISIONS[precision]
    options = sampling_of(pipe, record)
    bar = tqdm(total=total, initial=len(done), unit="img", desc="sampling", dynamic_ncols=True,
               disable=rank != 0 or not progress)
    written = new_total = 0
    # Ranks take the same number of rounds (idle ones too) so that the per-round sum below can count
    # the images of all ranks for the progress bar.
    for round_ in range(math.ceil(len(todo) / world)):
        new = 0
        if round_ < len(mine):
            chunk = mine[round_]
            noise = [n.to(device) for n in pipe.model.noise_from_seeds(sample_seeds(seed, chunk), options)]
            batch_labels = None if labels is None else labels[chunk.start:chunk.stop].tolist()
            pixels = pipe(batch_labels, batch_size=len(chunk) if labels is None else None, output_type="np",
                          autocast_dtype=autocast_dtype, sampling=options, noise=noise)
            for index, image in zip(chunk, pixels):
                if index in done:
                    continue
                atomic_write(png_path(images_dir, index, total),
                             lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"))
                new += 1
                written += 1
                if stop_after is not None and written >= stop_after:
                    raise SimulatedKill(f"stopped after writing {written} images")
        new = all_sum(new, device)
        new_total += new
        bar.update(new)
    bar.close()

    fresh = new_total == 0 and (out / NPZ_FILE).is_file()  # nothing changed since it was written
    if rank == 0 and format in ("npz", "both") and not complete and not fresh:
        files = [png_path(images_dir, i, total) for i in range(total)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images are missing, e.g. {missing[0]}; rerun to sample them")
        write_npz(out / NPZ_FILE, files, labels)
    if rank == 0 and format == "npz" and images_dir.is_dir():
        shutil.rmtree(images_dir)  # the intermediate of a finished npz-only run
    if rank == 0:
        where = {"png": f"{images_dir}/", "npz": f"{out / NPZ_FILE}", "both": f"{images_dir}/ and {out / NPZ_FILE}"}
        print(f"eval.sample: {total} images ({new_total} sampled now) in {where[format]}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
        np.save(f, array)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.sample",
        description="Sample an evaluation set from a pipeline folder, resumably, on any number of processes "
                    "(start with torchrun for several). Rerun the same command to resume.",
    )
    p.add_argument("pipeline", help="pipeline folder (FlowAR: model files + vae/; VAR, FlexVAR: + tokenizer/), as "
                                    "written by save_pretrained")
    p.add_argument("--out", required=True, help="output folder (run.json, labels.npy, images/, samples.npz)")
    p.add_argument("--per-class", type=int, default=None, help=f"images per class (default {DEFAULT_PER_CLASS})")
    p.add_argument("--num-classes", type=int, default=None, help="sample classes 0..N-1 (default: all the model's)")
    p.add_argument("--num-samples", type=int, default=None, help="total images, for an unconditional model")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass, per process")
    guidance = p.add_argument_group("guidance and scales, every family (default: the model's)")
    guidance.add_argument("--guidance-scale", type=float, default=None, help="1 = unguided")
    guidance.add_argument("--cfg-schedule", default=None, help=f"one of {CFG_SCHEDULES}")
    guidance.add_argument("--scales", type=parse_scales, default=None,
                          help="sides to sample, e.g. 1,2,4,8,12, or 1,2,4,8x12 for a grid that is not square "
                               "(FlexVAR, or a FlowAR with positions='grid')")
    flowar_args = p.add_argument_group("FlowAR and xAR sampling (default: the model's)")
    flowar_args.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                             help="times in which guidance applies, t=1 noise")
    flowar_args.add_argument("--steps", type=parse_step_counts, default=None,
                             help="steps per scale (FlowAR) or per cell (xAR), one count or one per scale, e.g. "
                                  "20,20,20,10")
    flowar_args.add_argument("--solver", default=None, help=f"one of {FLOW_SOLVERS} (the model checks its own)")
    flowar_args.add_argument("--schedule", default=None, help=f"ODE step schedule, one of {SCHEDULES}")
    flowar_args.add_argument("--atol", type=float, default=None, help="dopri5 tolerance")
    flowar_args.add_argument("--rtol", type=float, default=None, help="dopri5 tolerance")
    var_args = p.add_argument_group("VAR and FlexVAR sampling (default: the model's)")
    var_args.add_argument("--var-cfg", type=float, default=None, help="guidance in VAR's convention, 0 = unguided")
    var_args.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens, 0 = all")
    var_args.add_argument("--top-p", type=float, default=None, help="nucleus mass, 0 = off")
    var_args.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sample i draws its randomness from a seed made of (seed, i)")
    p.add_argument("--format", default="both", help=f"one of {FORMATS}; with npz the PNGs are the resumable "
                                                    "intermediate, deleted once samples.npz is written")
    p.add_argument("--precision", default="fp32", help=f"one of {tuple(PRECISIONS)} (bf16: networks under autocast)")
    p.add_argument("--compile", dest="compiled", action="store_true",
                   help="torch.compile the generator's hot modules (pays off over a large evaluation set)")
    p.add_argument("--device", default=None, help="default: cuda (one GPU per torchrun process) if available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        run(args.pop("pipeline"), args.pop("out"), **args)
    except (ValueError, FileNotFoundError) as err:
        print(f"eval.sample: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
