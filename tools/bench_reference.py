"""The benchmarks against the authors' FlowAR code: their sampler or training step timed beside ours.

    python -m tools.bench_reference sample --reference /path/to/FlowAR --preset flowar-s --batch 2 \\
        --precision fp32,bf16 --steps 25,25/17/13/9/7 --timm-path /tmp/timm_pkg
    python -m tools.bench_reference sample --reference /path/to/FlowAR --preset flowar-s --batch 2 \
        --precision fp32,bf16 --solver flow-map --schedule uniform --steps 2 --guidance-scale 1 --timm-path /tmp/timm_pkg
    python -m tools.bench_reference train --reference /path/to/FlowAR --preset flowar-s --batch 4 \\
        --precision fp32,bf16 --timm-path /tmp/timm_pkg

``sample`` takes the options of ``eval/bench_sample.py``, ``train`` those of ``python -m train.bench``, plus
``--reference PATH`` (a checkout of the authors' code, imported as ``tools/parity_flowar.py`` does; one of
the FlowAR-S/L/H presets), ``--timm-path`` (a folder holding timm, if it is not installed) and ``--small``
(both sides in the parity tool's reduced layout, to check the harness in seconds; not a benchmark). The
tables are the shipped benchmarks' own, with the authors' row first.

``sample`` times their FlowAR ``sample_tokens`` in fp32, as released, against our rows on the same weights,
all in one process: every round calls each side once in turn, and the fastest call of each counts
(``--repeats`` rounds, default 2). Their sampler runs the preset's settings (its cfg, guidance interval and
step count; FlowAR-S: 25 points, 24 Euler steps per scale). Before timing, each of our rows samples from
their first call's initial noise, and the table gives how far its latents lie from theirs
(max |ours - theirs| / max |theirs|): fp32 at the same steps must agree to float precision; bf16 or fewer
steps show what they change. ``--solver flow-map`` rows run a flow-map head on the same weights (as
``train.distill_head`` starts its student), at the given jumps per scale and guidance: what a distilled few-step
FlowAR of that size costs. Peak memory is not given (one process holds both models), nor ``--decode``.

``train`` adds their step as released: fp32 (their engine turns autocast off for the forward), their
forward, backward, clipping at 3.0, AdamW (0.9, 0.95) over the same parameter groups in torch's default
kernel, and their EMA loop over the parameters at 0.9999. Each row's peak memory comes from its own process;
the times come from one more process that holds their model and ours on the same weights and steps each in
turn, the fastest step of each counting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval import bench_sample
from eval.bench_sample import add_peak_share, family_options, format_table, run_isolated, steps_options
from flowar import FlowAR
from flowar.outputs import PRECISIONS, autocast_context
from heads.solvers import step_schedule
from tools import parity_flowar as parity
from train import bench as train_bench
from train.bench import EMA_DECAY, count_and_compile, our_step, row_of
from train.distill_head import build_student
from train.train import param_groups

PROG = "python -m tools.bench_reference"


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("the authors' code")
    group.add_argument("--reference", required=True, help="checkout of the authors' FlowAR code (holds "
                       "models/flowar.py); FlowAR-S/L/H presets")
    group.add_argument("--timm-path", default=None, help="folder holding timm, if not installed")
    group.add_argument("--small", action="store_true", help="both sides in tools/parity_flowar.py's reduced "
                       "layout, to check the harness in seconds (not a benchmark)")


# ---------------------------------------------------------------------------------------------- sampling
def measure_against_reference(reference_path: str, timm_path: str | None, preset: str, batch: int,
                              variants: list[tuple[str, bool, dict]], options: dict, device_name: str,
                              repeats: int, small: bool = False) -> list[dict]:
    """The authors' fp32 sampler and our ``variants`` ((precision, compiled, option overrides) each) on the
    same weights in this process, interleaved; the first row is theirs. See the module docstring. small:
    both sides in ``tools/parity_flowar.py``'s reduced layout (a check of the harness, not a benchmark)."""
    device = torch.device(device_name)
    modules = parity.import_reference(reference_path, timm_path=timm_path)
    config = parity.reference_config(preset, small=small)
    torch.manual_seed(0)
    theirs = parity.build_reference(modules["flowar"], preset, config, small=small)
    ours, _ = parity.ours_from_reference(theirs, config)
    theirs.to(device).eval()
    ours.to(device).eval()
    defaults = config.sampling
    cfg, high, steps = defaults.guidance_scale, defaults.guidance_interval[1], defaults.steps_at(0)
    if not isinstance(steps, int) or steps < 2 or defaults.solver != "euler" or defaults.guidance_interval[0] != 0:
        raise ValueError(f"{preset}'s sampling defaults have no counterpart in the reference sampler")
    labels = torch.arange(batch, device=device) % config.num_classes
    their_options = dict(num_steps=steps, guidance=high, cfg=cfg, labels=labels)
    # Their sampler switches to the uniform grid at 50 steps; ours takes the grid as an option.
    same_settings = dict(guidance_scale=cfg, guidance_interval=(0.0, high), steps=steps,
                         schedule="uniform" if steps == 50 else "flowar")

    def run_theirs(record: bool = False):
        with torch.inference_mode(), parity.cuda_calls_as_noop(), \
                (parity.record_draws(list(modules.values())) if record else contextlib.nullcontext()) as draws:
            latents = theirs.sample_tokens(**their_options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return latents, draws

    counter = FlopCounterMode(display=False)
    with counter:
        their_latents, draws = run_theirs(record=True)
    noise = [n[:batch] for _, n in draws]  # the conditional rows; ours draws no noise for the null rows
    rows = [{"implementation": "authors", "batch": batch, "precision": "fp32", "compile": "off", "steps": str(steps),
             "head NFE": len(config.scales) * (len(step_schedule(steps, same_settings["schedule"])) - 1),
             "vs authors' latents": "-", "flops": counter.get_total_flops(), "run": lambda: run_theirs()[0]}]

    for precision, compiled, overrides in variants:
        given = {k: v for k, v in family_options(ours, options).items() if v is not None}
        settings = {**same_settings, **given, **overrides}
        model = ours
        if settings.get("solver") == "flow-map":
            # A flow-map head on the same weights (its interval embedding zero at the output, as distillation
            # starts it; its own copy, so compiling it leaves the other rows eager): it costs what a distilled
            # head costs, and its jumps land where as many Euler steps of the released head do.
            model = build_student(ours, settings["steps"]).to(device).eval()
        elif compiled:  # a second copy of the same weights, so the eager rows stay eager
            model = FlowAR(config).to(device).eval()
            model.load_state_dict(ours.state_dict())

        generator = torch.Generator(device).manual_seed(1)

        def run_ours(model=model, settings=settings, precision=precision, generator=generator, given_noise=None):
            with torch.inference_mode(), autocast_context(device, PRECISIONS[precision]):
                out = model.sample_with_stats(labels, noise=given_noise, generator=generator, **settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        counter = FlopCounterMode(display=False)
        with counter:
            out = run_ours(given_noise=noise)
        gap = (out.latents.double() - their_latents.double()).abs().max() / their_latents.double().abs().max()
        note = "off"
        if compiled:
            model.compile_for_sampling()
            start = time.perf_counter()
            run_ours()
            note = f"on ({time.perf_counter() - start:.0f} s first call)"
        steps_label = settings["steps"]
        rows.append({"implementation": "ours", "batch": batch, "precision": precision, "compile": note,
                     "steps": "/".join(map(str, steps_label)) if isinstance(steps_label, tuple) else str(steps_label),
                     "head NFE": out.nfe, "vs authors' latents": f"{gap.item():.1e}",
                     "flops": counter.get_total_flops(), "run": lambda run=run_ours: run()})

    best = [float("inf")] * len(rows)
    for _ in range(repeats):
        for i, row in enumerate(rows):
            start = time.perf_counter()
            row["run"]()
            best[i] = min(best[i], time.perf_counter() - start)
    table = []
    for row, seconds in zip(rows, best):
        flops = row.pop("flops")
        row.pop("run")
        table.append({**row, "images/s": batch / seconds, "ms/image": 1000 * seconds / batch,
                      "GFLOP/image": flops / batch / 1e9, "TFLOP/s": flops / seconds / 1e12})
    return table


def sample_main(argv) -> int:
    p = bench_sample.build_parser(description=__doc__, prog=f"{PROG} sample",
                                  repeats_help="interleaved rounds; the fastest call of each side counts (default 2)")
    add_reference_arguments(p)
    args = p.parse_args(argv)
    s = bench_sample.settings_from_args(p, args, default_repeats=2)
    if len(s.presets) != 1 or s.presets[0] not in parity.REFERENCE_MODELS:
        p.error(f"--reference takes one --preset of {sorted(parity.REFERENCE_MODELS)}, got {args.preset!r}")
    if args.decode:
        p.error("--reference times the generator only; drop --decode")
    peaks = bench_sample.print_header(s, args.batch, False, f"{s.repeats} interleaved rounds")
    variants = [(precision, compiled, steps_options(steps))
                for steps in s.step_settings for precision in s.precisions for compiled in s.compiles]
    rows = []
    for batch in s.batches:
        rows += run_isolated(measure_against_reference, args.reference, args.timm_path, s.presets[0], batch,
                             variants, s.options, str(s.device), s.repeats, args.small)
    add_peak_share(rows, peaks)
    print(format_table(rows))
    for batch in s.batches:
        base, *group = [r for r in rows if r["batch"] == batch]
        print(f"batch {batch}, speed against the authors' fp32: " + ", ".join(
            f"{r['precision']}{' compiled' if r['compile'] != 'off' else ''} {r['steps']} steps "
            f"{r['images/s'] / base['images/s']:.2f}x" for r in group))
    return 0


# ---------------------------------------------------------------------------------------------- training
def their_step(model: torch.nn.Module, config, batch: int, device: torch.device):
    """``step()`` doing one training step of the authors' ``model`` as their engine does it (see above)."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4, betas=(0.9, 0.95))
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    side = config.scales[-1]
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, config.token_dim, side, side, generator=generator, device=device)
    labels = torch.arange(batch, device=device) % config.num_classes

    def step():
        with parity.cuda_calls_as_noop():
            loss = model(latents, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for average, p in zip(ema, params):  # their update_ema
                average.mul_(EMA_DECAY).add_(p, alpha=1 - EMA_DECAY)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def build_reference_pair(reference_path: str, timm_path: str | None, preset: str, small: bool, device):
    """The authors' model for ``preset`` (train mode) and our config matching it."""
    modules = parity.import_reference(reference_path, timm_path=timm_path)
    config = parity.reference_config(preset, small=small)
    torch.manual_seed(0)
    theirs = parity.build_reference(modules["flowar"], preset, config, small=small).to(device).train()
    return theirs, config


def measure_reference_memory(reference_path: str, timm_path: str | None, preset: str, batch: int,
                             device_name: str, steps: int, small: bool = False) -> float:
    """Peak memory of the authors' step in this (fresh) process, after ``steps`` steps."""
    device = torch.device(device_name)
    theirs, config = build_reference_pair(reference_path, timm_path, preset, small, device)
    step = their_step(theirs, config, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    return bench_sample.peak_memory_mib(device)


def time_against_reference(reference_path: str, timm_path: str | None, preset: str, batch: int,
                           variants: list[tuple[str, bool, bool]], device_name: str, warmup: int, steps: int,
                           small: bool = False) -> list[dict]:
    """Their step and our ``variants`` ((precision, compiled, checkpointing) each), on the same initial weights,
    stepped in turn ``warmup + steps`` times; the fastest timed step of each counts. First row theirs."""
    device = torch.device(device_name)
    theirs, config = build_reference_pair(reference_path, timm_path, preset, small, device)
    # Our copies take their initial weights before any of their steps changes them.
    ours = [parity.ours_from_reference(theirs, dataclasses.replace(config, grad_checkpointing=checkpointing))[0]
            for _, _, checkpointing in variants]
    step = their_step(theirs, config, batch, device)
    entries = [("authors", "fp32", "off", False, step, count_and_compile(step, theirs, False)[0])]
    for model, (precision, compiled, checkpointing) in zip(ours, variants):
        model.to(device).train()
        step = our_step(model, batch, precision, device)
        flops, note = count_and_compile(step, model, compiled)
        entries.append(("ours", precision, note, checkpointing, step, flops))
    best = [float("inf")] * len(entries)
    for round_ in range(warmup + steps):
        for i, entry in enumerate(entries):
            start = time.perf_counter()
            entry[4]()
            if round_ >= warmup:
                best[i] = min(best[i], time.perf_counter() - start)
    return [row_of(name, precision, note, checkpointing, batch, seconds, flops, None)
            for (name, precision, note, checkpointing, _, flops), seconds in zip(entries, best)]


def train_main(argv) -> int:
    p = train_bench.build_parser(description=__doc__, prog=f"{PROG} train")
    add_reference_arguments(p)
    args = p.parse_args(argv)
    s = train_bench.settings_from_args(p, args)
    if s.preset not in parity.REFERENCE_MODELS:
        p.error(f"--reference takes a --preset of {sorted(parity.REFERENCE_MODELS)}, got {s.preset!r}")
    peaks = train_bench.print_header(s)
    rows = run_isolated(time_against_reference, args.reference, args.timm_path, s.preset, s.batch, s.variants,
                        str(s.device), s.warmup, s.steps, args.small)
    memory = [run_isolated(measure_reference_memory, args.reference, args.timm_path, s.preset, s.batch,
                           str(s.device), s.warmup + 1, args.small)]
    if args.small:  # our rows' memory in the small layout is not what train.bench.measure builds; leave it out
        memory += ["-"] * len(s.variants)
    else:
        # the reference's settings: no dropout, no label drop (tools.parity_flowar.reference_config)
        same = dict(attn_dropout=0.0, proj_dropout=0.0, label_drop=0.0)
        memory += [run_isolated(train_bench.measure, s.preset, s.batch, precision, str(s.device), s.warmup, 1,
                                compiled, checkpointing, same)["peak MiB"]
                   for precision, compiled, checkpointing in s.variants]
    for row, peak in zip(rows, memory):
        row["peak MiB"] = peak
    train_bench.print_rows(rows, peaks)
    return 0


# ---------------------------------------------------------------------------------------------- entry point
COMMANDS = {"sample": sample_main, "train": train_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:  # no command, an unknown one, or --help: argparse says which
        p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("command", choices=sorted(COMMANDS), help="the benchmark to run beside the authors' code")
        p.parse_args(argv[:1])
        return 2  # not reached: parse_args exits on a missing or unknown command
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
