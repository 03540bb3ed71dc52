"""Sweep a FlowAR pipeline's sampler: solver x steps x guidance scale x guidance interval x precision -> FID, NFE
and wall time.

    python -m eval.sweep runs/demo/flowar-release --out runs/sweep --digits \\
        --solvers euler,midpoint,rk4,dopri5 --steps 2,4,8 --guidance-scale 3 --num-samples 1000
    python -m eval.sweep runs/demo/flowar-release --out runs/anneal --digits --solvers euler \\
        --steps 10,10/8/6/4,10/6/4/2                    # per-scale step counts: fewer at the late scales
    python -m eval.sweep runs/demo/flowar-release --out runs/bf16 --digits --solvers euler --steps 10 \
        --precision fp32,bf16                           # the generator under bf16 autocast (never the decoder)
    python -m eval.sweep runs/demo-fs/distill/release --out runs/jumps --digits --solvers flow-map \
        --steps 1,2,4 --schedule uniform --guidance-scale 1   # a flow-map head: jumps per scale
    python -m eval.sweep runs/flexible/flowar-release --out runs/lists --digits --solvers euler --steps 10 \
        --scales 1/4/8,1/2/4/8,1/2/3/4/6/8,1/2/4/8/12      # a flexible model's scale lists (positions="grid")

Every configuration samples the same labels (cycling over the classes) from the same seed, so rows differ
only by the sampler. For each it records the head's NFE per image (summed over scales; dopri5 is adaptive,
its ``--tolerances`` take the place of ``--steps``; an entry a/b/c/d of ``--steps`` is one count per scale,
coarse to fine, as ``FlowARSampling.steps`` takes them; for the "flow-map" solver of a flow-map head they are
its jumps per scale, one evaluation each, and an ordinary head is refused before anything is sampled), the
wall time per image of sampling and decoding, and FID against ``--reference`` (an image folder, an images npz
or a mu/sigma npz; default with ``--digits``: the bundled training digits). ``--scales`` sweeps the
lists of sides a flexible FlowAR samples (``FlowARSampling.scales``; a model of fixed scales is refused before
anything is sampled); a larger last side makes larger images, which FID and the digit classifier resize. ``--digits`` also scores samples with the MNIST digit classifier
(``eval.quality``): class-consistency and the Frechet distance in its feature space.

Outputs in ``--out``: ``sweep.csv`` (one row per configuration, appended as each finishes; a rerun
skips the configurations already there), TensorBoard scalars (``fid/<solver> w=.. gi=..`` against NFE)
and ``sweep.png``: FID against NFE and against seconds per image, one line per solver.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowar import FlowARPipeline, FlowARSampling
from flowar.outputs import PRECISIONS, autocast_context, to_uint8_images
from heads.solvers import ADAPTIVE_SOLVERS as ADAPTIVE, SCHEDULES, SOLVERS, SolveOptions
from vae.pyramid import check_scale_list, parse_scale_list, scale_text

from .fid import compute_metrics
from .fid import reference_statistics
from .inception import FeatureNetwork, load_feature_network
from .quality import DigitScorer, training_digits_reference
from .reference import default_cache_dir

CSV_FIELDS = ("solver", "schedule", "steps", "scales", "tolerance", "guidance_scale", "guidance_low", "guidance_high", "precision",
              "nfe_per_image", "seconds_per_image", "fid", "class_consistency", "digit_frechet", "num_samples")


@dataclass(frozen=True)
class SweepPoint:
    """One sampler configuration."""

    solver: str
    schedule: str  # the step schedule of heads.solvers (fixed-step solvers)
    steps: int | tuple[int, ...]  # one count for every scale, or one per scale; 0 for adaptive solvers
    tolerance: float  # atol = rtol for adaptive solvers; 0 otherwise
    guidance_scale: float  # 1 = unguided
    guidance: tuple[float, float]
    precision: str = "fp32"  # a key of PRECISIONS: the generator's autocast
    scales: tuple[int, ...] | None = None  # the sides sampled (None: the model's)

    def key(self) -> tuple:
        return (self.solver, self.schedule, self.steps_label(), self.scales_label(), f"{self.tolerance:g}",
                f"{self.guidance_scale:g}", f"{self.guidance[0]:g}", f"{self.guidance[1]:g}", self.precision)

    def scales_label(self) -> str:
        """The scales as the CSV and ``--scales`` write them: "1/2/3/5/8" ("1/2/4/8x12"), or "model" for the
        model's own."""
        return "model" if self.scales is None else "/".join(map(scale_text, self.scales))

    def steps_label(self) -> str:
        """The steps as the CSV and ``--steps`` write them: "8", or "8/6/5/4" per scale."""
        return "/".join(map(str, self.steps)) if isinstance(self.steps, tuple) else str(self.steps)

    def sampling_options(self) -> dict:
        """This point as ``FlowARSampling`` fields."""
        options = dict(guidance_scale=self.guidance_scale, guidance_interval=self.guidance, solver=self.solver,
                       schedule=self.schedule, steps=None if self.tolerance else self.steps, scales=self.scales)
        if self.tolerance:
            options.update(atol=self.tolerance, rtol=self.tolerance)
        return options

    def series(self) -> str:
        """The plot/TensorBoard line this point belongs to (everything but steps and tolerance)."""
        return series_name(self.solver, f"{self.guidance_scale:g}", f"{self.guidance[0]:g}", f"{self.guidance[1]:g}",
                           self.precision, self.scales_label())


def series_name(solver: str, scale: str, low: str, high: str, precision: str, scales: str = "model") -> str:
    return (f"{solver} w={scale} gi={low}-{high}" + ("" if precision == "fp32" else f" {precision}")
            + ("" if scales == "model" else f" scales {scales}"))


def sweep_points(solvers, steps, tolerances, cfgs, intervals, *, schedule: str,
                 precisions=("fp32",), scale_lists=(None,)) -> list[SweepPoint]:
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"precisions must be among {list(PRECISIONS)}, got {precision!r}")
    for solver in solvers:
        if solver not in SOLVERS:
            raise ValueError(f"solvers must be among {list(SOLVERS)}, got {solver!r}")
    counts = [c for s in steps for c in (s if isinstance(s, tuple) else (s,))]
    if not steps or not counts or any(c < 1 for c in counts):
        raise ValueError(f"steps must be integers >= 1 (or per-scale lists of them), got {steps}")
    if not tolerances or any(not t > 0 for t in tolerances):
        raise ValueError(f"tolerances must be > 0, got {tolerances}")
    # The combinations are checked where every sampler checks them (e.g. the flowar grid needs 2 steps),
    # before anything is sampled.
    for solver in solvers:
        for n in ([None] if solver in ADAPTIVE else counts):
            for tol in (tolerances if solver in ADAPTIVE else [1.0]):
                SolveOptions(solver=solver, steps=n, schedule=schedule, atol=tol, rtol=tol)
    for low, high in intervals:
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"guidance intervals must satisfy 0 <= low < high <= 1, got ({low}, {high})")
    scale_lists = [None if sides is None else check_scale_list(sides, name="--scales", grids=True)
                   for sides in scale_lists]
    points = []
    for solver, cfg, interval, precision, sides in itertools.product(solvers, cfgs, intervals, precisions, scale_lists):
        if solver in ADAPTIVE:
            points += [SweepPoint(solver, schedule, 0, tol, cfg, interval, precision, sides) for tol in tolerances]
        else:
            points += [SweepPoint(solver, schedule, n, 0.0, cfg, interval, precision, sides) for n in steps]
    return points


@torch.no_grad()
def sample_point(pipe: FlowARPipeline, point: SweepPoint, labels, *, batch_size: int, seed: int):
    """uint8 images, NFE per image, seconds per image (sampling and decoding) for one configuration."""
    options = dict(point.sampling_options(), generator=torch.Generator(pipe.device).manual_seed(seed))
    images, nfe = [], []
    start = time.perf_counter()
    for chunk in labels.split(batch_size):
        with autocast_context(pipe.device, PRECISIONS[point.precision]):
            out = pipe.model.sample_with_stats(None if pipe.model.config.unconditional else chunk.to(pipe.device),
                                               batch_size=len(chunk), **options)
        images.append(to_uint8_images(pipe.vae.decode(out.latents)))
        nfe.append(out.nfe)
    seconds = (time.perf_counter() - start) / len(labels)
    return np.concatenate(images), float(np.mean(nfe)), seconds


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [name for name in CSV_FIELDS if name not in (reader.fieldnames or [])]
        if missing:
            # A sweep appends to its file; rows of another layout cannot be compared with the new ones.
            raise ValueError(f"{path} lacks the columns {missing} of a sweep.csv; give --out a new folder")
        return list(reader)


def row_key(row: dict) -> tuple:
    """What makes a row: its sampler configuration and sample count (a rerun with more samples redoes it)."""
    return (str(row["num_samples"]), row["solver"], row["schedule"], row["steps"], row["scales"], row["tolerance"],
            row["guidance_scale"], row["guidance_low"], row["guidance_high"], row["precision"])


def plot(rows: list[dict], path: Path) -> None:
    """FID against NFE and against seconds per image, one line per solver (and guidance scale / interval)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for row in rows:
        name = series_name(row["solver"], row["guidance_scale"], row["guidance_low"], row["guidance_high"],
                           row["precision"], row["scales"])
        series.setdefault(name, []).append(row)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for name, members in sorted(series.items()):
        members.sort(key=lambda r: float(r["nfe_per_image"]))
        fid = [float(r["fid"]) for r in members]
        axes[0].plot([float(r["nfe_per_image"]) for r in members], fid, marker="o", label=name)
        axes[1].plot([float(r["seconds_per_image"]) for r in members], fid, marker="o", label=name)
    for axis, xlabel in zip(axes, ("head NFE per image (all scales)", "seconds per image (sample + decode)")):
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("FID")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"FID against sampling cost ({rows[0]['num_samples']} samples per point)")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_sweep(pipeline_dir, out, points: list[SweepPoint], *, num_samples: int, reference=None, digits: bool = False,
              batch_size: int = 100, seed: int = 0, device: str = "cpu", network=None) -> list[dict]:
    """Run every point not yet in ``out/sweep.csv``; return all rows; write the CSV, TensorBoard and plot."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if reference is None and not digits:
        raise ValueError("reference is required unless digits=True (then the bundled training digits are used)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = FlowARPipeline.from_pretrained(pipeline_dir).to(device)
    for point in points:  # the model's own checks, before anything is sampled (e.g. one count per scale)
        pipe.model.sampling_options(**point.sampling_options())
    network = load_feature_network(network, device=device) if not isinstance(network, FeatureNetwork) else network
    scorer = DigitScorer.load_or_train(out / "digit-classifier") if digits else None
    if reference is None:  # the demo's reference file: its features are cached once for every sweep and run
        reference = training_digits_reference()
    reference = reference_statistics(reference, network=network, cache_dir=default_cache_dir(), progress=False)
    classes = max(pipe.model.config.num_classes, 1)
    labels = torch.arange(num_samples) % classes
    csv_path = out / "sweep.csv"
    rows = read_rows(csv_path)
    done = {row_key(r) for r in rows}
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    for point in points:
        if (str(num_samples), *point.key()) in done:
            continue
        images, nfe, seconds = sample_point(pipe, point, labels, batch_size=batch_size, seed=seed)
        fid = compute_metrics(images, reference, network=network, progress=False)["fid"]
        row = dict(zip(CSV_FIELDS, (*point.key(), f"{nfe:g}", f"{seconds:.5f}", f"{fid:.4f}", "", "", num_samples)))
        if scorer is not None:
            report = scorer.score(images, labels.numpy())
            row.update(class_consistency=f"{report.class_consistency:.4f}", digit_frechet=f"{report.frechet_distance:.4f}")
        new_file = not csv_path.is_file()
        with csv_path.open("a", newline="") as f:  # one row at a time, so a killed sweep keeps its rows
            out_csv = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new_file:
                out_csv.writeheader()
            out_csv.writerow(row)
        rows.append(row)
        writer.add_scalar(f"fid/{point.series()}", fid, int(round(nfe)))
        writer.add_scalar(f"seconds_per_image/{point.series()}", seconds, int(round(nfe)))
        print(f"{point.series():40s} steps {point.steps_label():>3s} tol {point.tolerance:g}: NFE {nfe:6.1f}, "
              f"{seconds * 1000:7.1f} ms/img, FID {fid:7.2f}"
              + (f", class-consistency {float(row['class_consistency']):.1%}" if scorer is not None else ""))
    writer.close()
    if rows:
        plot(rows, out / "sweep.png")
    return rows


def parse_steps(text: str) -> list[int | tuple[int, ...]]:
    """``--steps``: "2,4,8" -> [2, 4, 8]; "10,8/6/5/4" -> [10, (8, 6, 5, 4)]."""
    try:
        return [tuple(int(c) for c in v.split("/")) if "/" in v else int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"--steps takes integers and per-scale lists such as 8/6/5/4, comma-separated; got {text!r}") from None


def parse_scale_lists(text: str | None) -> list[tuple | None]:
    """``--scales``: "1/4/8,1/2/3/4/6/8,1/2/4/8x12" -> [(1, 4, 8), (1, 2, 3, 4, 6, 8), (1, 2, 4, (8, 12))]; None
    -> [None], the model's own."""
    if text is None:
        return [None]
    try:
        return [parse_scale_list(entry.replace("/", ",")) for entry in text.split(",") if entry]
    except ValueError:
        raise ValueError(f"--scales takes lists of sides such as 1/2/3/5/8 (HEIGHTxWIDTH for a grid that is not "
                         f"square, 1/2/4/8x12), comma-separated; got {text!r}") from None


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="a FlowAR release folder (model + vae/)")
    p.add_argument("--out", required=True)
    p.add_argument("--solvers", default="euler,midpoint,rk4,dopri5")
    p.add_argument("--steps", default="2,4,8",
                   help="comma list, fixed-step solvers; an entry a/b/c/d is one count per scale, coarse to fine")
    p.add_argument("--scales", default=None,
                   help="comma list of scale lists such as 1/2/3/5/8 (a flexible model's; default: the model's own)")
    p.add_argument("--schedule", default=FlowARSampling().schedule, choices=SCHEDULES,
                   help="step schedule of fixed-step solvers (default: FlowAR's)")
    p.add_argument("--tolerances", default="1e-2,1e-3", help="comma list of atol=rtol, adaptive solvers")
    p.add_argument("--guidance-scale", default="3", help="comma list (1 = unguided)")
    p.add_argument("--guidance-interval", action="append", metavar="LOW,HIGH",
                   help="repeatable; default 0,1 (guidance everywhere)")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS)
                   + ": the generator's autocast (the decoder stays in its own dtype)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--reference", help="image folder, images npz or mu/sigma npz (default with --digits: MNIST)")
    p.add_argument("--digits", action="store_true", help="also score with the MNIST digit classifier")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        intervals = [tuple(_floats(v)) for v in (args.guidance_interval or ["0,1"])]
        if any(len(i) != 2 for i in intervals):
            raise ValueError(f"--guidance-interval takes LOW,HIGH, got {args.guidance_interval}")
        points = sweep_points(args.solvers.split(","), parse_steps(args.steps),
                              _floats(args.tolerances), _floats(args.guidance_scale), intervals, schedule=args.schedule,
                              precisions=[v for v in args.precision.split(",") if v],
                              scale_lists=parse_scale_lists(args.scales))
        run_sweep(args.pipeline, args.out, points, num_samples=args.num_samples, reference=args.reference,
                  digits=args.digits, batch_size=args.batch_size, seed=args.seed, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / 'sweep.csv'} and {Path(args.out) / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
