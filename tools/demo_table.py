"""Demo runs side by side: mean +- sd over seeds of what ``train.demo`` measured, one row per model.

    python -m tools.demo_table runs/demo-s0 runs/demo-s1 runs/demo-s2 runs/ms-s0 ... [--time]

Each argument is a demo output folder holding ``results.json``. Rows group the runs by model, by the
training-config overrides the run was given (``train.demo --set``), by its VAE options (``--kl-weight``,
``--latent-norm``), by its distillation overrides (``--distill``) and by the sampling overrides of a rescored
run (``train.demo --rescore RUN --sample``), so the rows of an ablation come apart;
each cell is the mean +- sample sd over the runs (seeds) of that row. ``--time`` also times sampling in this one
process: each row's first release samples the same 100 labels at its saved settings (with a rescored row's
sampling overrides), the rows taking turns, ``--repeats`` rounds, the fastest round counting; so the ms/image column is a side-by-side
measurement, unlike the demo's own wall times.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

COLUMNS = [  # (results.json key, header, format)
    ("head_evaluations", "head evaluations / image", "{:.0f}"),
    ("head_rows_per_image", "head token rows / image", "{:.0f}"),
    ("class_consistency", "class-consistency %", "{:.1f}"),
    ("worst_digit", "worst digit %", "{:.1f}"),
    ("frechet_distance", "classifier Frechet", "{:.1f}"),
    ("fid", "FID", "{:.1f}"),
    ("minutes", "run minutes", "{:.1f}"),
    ("distill_minutes", "of which distillation", "{:.1f}"),
    ("demo_minutes", "demo minutes without FID", "{:.1f}"),
]
PERCENT = ("class_consistency", "worst_digit")


def read_runs(folders) -> dict[str, list[dict]]:
    """results.json of each folder, grouped by model and overrides (in the order first seen); a row's name is
    the model, its training precision, then its VAE's options where they differ from the demo's, its training
    overrides, its distillation ones (``train.demo --distill``), then its sampling ones, e.g. ``flowar bf16
    model.head_batch_mul=4``, ``flowar bf16 vae latent_norm=per-channel``, ``flowar-fewstep bf16 distill lr=0.001``
    or ``flowar bf16 sampling steps=20`` (``precision=bf16`` last for a row rescored with ``--sampling-precision
    bf16``)."""
    groups: dict[str, list[dict]] = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no results.json (written by python -m train.demo)")
        run = json.loads(path.read_text())
        if run.get("per_digit"):
            run["worst_digit"] = min(run["per_digit"])
        if run.get("minutes") is not None and (run.get("fid") is None or run.get("fid_minutes") is not None):
            # What the demo takes without --fid; a few-step run that distilled a FlowAR run adds that run's time.
            run["demo_minutes"] = run["minutes"] - run.get("fid_minutes", 0.0) + run.get("teacher_minutes", 0.0)
        sampling = run.get("sampling_overrides") or []
        if run.get("sampling_precision", "fp32") != "fp32":  # rescored under autocast (train.demo --sampling-precision)
            sampling = [*sampling, f"precision={run['sampling_precision']}"]
        precision = [run["precision"]] if run.get("precision") else []  # recorded since the demo trains in bf16
        vae = run.get("autoencoder_overrides") or []  # recorded since the demo has VAE levers
        distill = run.get("distill_overrides") or []
        name = " ".join([run["model"], *precision, *(["vae", *vae] if vae else []), *run.get("overrides", []),
                         *(["distill", *distill] if distill else []), *(["sampling", *sampling] if sampling else [])])
        groups.setdefault(name, []).append(run)
    return groups


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, sd


def cell(runs: list[dict], key: str, fmt: str) -> str:
    values = [float(r[key]) * (100 if key in PERCENT else 1) for r in runs if r.get(key) is not None]
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    if len(values) == 1 or sd == 0:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(sd)}"


def time_sampling(groups: dict[str, list[dict]], *, repeats: int, batch: int = 100) -> dict[str, float]:
    """ms/image of each row's first release at the row's sampling (a rescored row's overrides and sampling
    precision applied), the rows interleaved in this process."""
    from flowar import load_pipeline
    from eval.machine import fastest_in_turn
    from flowar.outputs import PRECISIONS
    from train.demo import sampling_options

    pipes = {model: load_pipeline(runs[0]["release"]) for model, runs in groups.items()}
    options = {model: {**sampling_options(runs[0].get("sampling_overrides") or []),
                       "autocast_dtype": PRECISIONS[runs[0].get("sampling_precision", "fp32")]}
               for model, runs in groups.items()}
    labels = [i % 10 for i in range(batch)]
    calls = [lambda round_, pipe=pipe, model=model: pipe(labels, output_type="np", generator=torch.Generator().manual_seed(
        round_), **options[model]) for model, pipe in pipes.items()]
    seconds = fastest_in_turn(calls, repeats)
    return {model: 1000 * s / batch for model, s in zip(pipes, seconds)}


def format_table(groups: dict[str, list[dict]], timing: dict[str, float] | None = None) -> str:
    headers = ["model", "seeds", *(h for _, h, _ in COLUMNS)] + (["sampling ms / image (one run)"] if timing else [])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for model, runs in groups.items():
        row = [model, ", ".join(str(r["seed"]) for r in runs), *(cell(runs, k, f) for k, _, f in COLUMNS)]
        if timing:
            row.append(f"{timing[model]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="demo output folders (each with results.json)")
    p.add_argument("--time", action="store_true", help="time each model's sampling, interleaved in this process")
    p.add_argument("--repeats", type=int, default=3, help="rounds of --time; the fastest counts")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        groups = read_runs(args.runs)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        p.error(str(err))
    timing = time_sampling(groups, repeats=args.repeats) if args.time else None
    first = next(iter(groups.values()))[0]
    print(f"{first.get('cores')} cores, {first.get('torch_threads')} torch threads, torch {first.get('torch')}"
          + (f"; sampling timed here at {torch.get_num_threads()} torch threads" if timing else ""))
    print(format_table(groups, timing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
