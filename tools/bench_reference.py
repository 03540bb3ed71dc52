"""The benchmarks against the authors' code: their FlowAR or xAR sampler, or their FlowAR training step, timed
beside ours.

    python -m tools.bench_reference sample --reference /path/to/FlowAR --preset flowar-s --batch 2 \\
        --precision fp32,bf16 --steps 25,25/17/13/9/7 --timm-path /tmp/timm_pkg
    python -m tools.bench_reference sample --reference /path/to/FlowAR --preset flowar-s --batch 2 \\
        --precision fp32,bf16 --solver flow-map --schedule uniform --steps 2 --guidance-scale 1 --timm-path /tmp/timm_pkg
    python -m tools.bench_reference sample --reference /path/to/xAR --preset xar-b --batch 2 \\
        --precision fp32,bf16 --steps 40,20 --solver sde,euler --timm-path /tmp/timm_pkg
    python -m tools.bench_reference train --reference /path/to/FlowAR --preset flowar-s --batch 4 \\
        --precision fp32,bf16 --timm-path /tmp/timm_pkg

``sample`` takes the options of ``eval/bench_sample.py``, ``train`` those of ``python -m train.bench``, plus
``--reference PATH`` (a checkout of the authors' code: FlowAR's for the FlowAR-S/L/H presets, imported as
``tools/parity_flowar.py`` does; OliverRensu/xAR's for xAR-B/L/H, imported as ``tools/parity_xar.py`` does),
``--timm-path`` (a folder holding timm, if it is not installed) and ``--small`` (both sides in the parity tool's
reduced layout, to check the harness in seconds; not a benchmark). The tables are the shipped benchmarks' own,
with the authors' row first and each row's speed against it last.

``sample`` times the authors' sampler in fp32, as released, against our rows on the same weights, all in one
process: every round calls each side once in turn, and the fastest call of each counts (``--repeats`` rounds,
default 2). Before timing, each of our rows samples from the draws their first call made, and the table gives
how far its latents lie from theirs (max |ours - theirs| / max |theirs|): fp32 at the same settings must agree to
float precision; bf16, other steps or another solver show what they change.

- FlowAR: their ``sample_tokens`` runs the preset's settings (its cfg, guidance interval and step count;
  FlowAR-S: 25 points, 24 Euler steps per scale) on their random init; every row of ours starts from their
  initial noise. ``--solver flow-map`` rows run a flow-map head on the same weights (as ``train.distill_head``
  starts its student), at the given jumps per scale and guidance: what a distilled few-step FlowAR of that
  size costs.
- xAR: their ``sample_tokens(num_steps=, cfg=, label=)`` runs the preset's cfg (xAR-B: 2.7, ramped over the
  cells) at the first ``--steps`` entry (default the preset's: xAR-B 40), on full-scale random weights
  (``tools.parity_xar.randomize_``). Their draws are each cell's initial noise and one noise per SDE step: our
  SDE rows at their step count take them all, our ODE rows (``--solver euler`` and the like) the initial noise;
  SDE rows at another count share no noise path with theirs ("-"). "head NFE" counts the transformer's
  evaluations (xAR's transformer is its own head).

Peak memory is not given (one process holds both models), nor ``--decode``.

``train`` adds their FlowAR step as released: fp32 (their engine turns autocast off for the forward), their
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
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval import bench_sample
from eval.bench_sample import add_peak_share, axis_options, family_options, format_table, run_isolated
from eval.machine import fastest_in_turn
from flowar.outputs import PRECISIONS, autocast_context
from heads.solvers import ADAPTIVE_SOLVERS, step_schedule
from tools import parity_flowar, parity_xar
from train import bench as train_bench
from train.bench import EMA_DECAY, count_and_compile, our_step, row_of
from train.distill_head import build_student
from train.train import param_groups

PROG = "python -m tools.bench_reference"


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("the authors' code")
    group.add_argument("--reference", required=True, help="checkout of the authors' code: FlowAR's (holds "
                       "models/flowar.py) for the FlowAR-S/L/H presets, OliverRensu/xAR (models/xar.py) for xAR-B/L/H")
    group.add_argument("--timm-path", default=None, help="folder holding timm, if not installed")
    group.add_argument("--small", action="store_true", help="both sides in the parity tool's reduced layout "
                       "(tools/parity_flowar.py, tools/parity_xar.py), to check the harness in seconds (not a benchmark)")


# ---------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass
class Side:
    """One family's half of the sampling benchmark: our model on the authors' weights, their row, and how their
    recorded draws reach our rows. The timing loop (:func:`measure_against_reference`) is shared."""

    ours: torch.nn.Module  # on the device, in eval mode
    labels: torch.Tensor
    same_settings: dict  # our sampling options that equal their sampler's
    their_row: dict  # the authors' row of the table, with "flops" and "run" (one timed call)
    their_latents: torch.Tensor
    noise_for: Callable[[dict], list | None]  # their draws as the noise of a row of these settings; None: none common


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flowar_side(reference_path: str, timm_path: str | None, preset: str, batch: int, device: torch.device,
                small: bool, steps: int | None = None) -> Side:
    """The authors' FlowAR ``sample_tokens`` with the preset's settings, on their random init (``steps`` must be
    None: their sampler has no counterpart of our per-scale lists, so it always runs the preset's count)."""
    if steps is not None:
        raise ValueError("the FlowAR reference runs the preset's step count; steps must be None")
    modules = parity_flowar.import_reference(reference_path, timm_path=timm_path)
    config = parity_flowar.reference_config(preset, small=small)
    torch.manual_seed(0)
    theirs = parity_flowar.build_reference(modules["flowar"], preset, config, small=small)
    ours, _ = parity_flowar.ours_from_reference(theirs, config)
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
        with torch.inference_mode(), parity_flowar.cuda_calls_as_noop(), \
                (parity_flowar.record_draws(list(modules.values())) if record else contextlib.nullcontext()) as draws:
            latents = theirs.sample_tokens(**their_options)
        _synchronize(device)
        return latents, draws

    counter = FlopCounterMode(display=False)
    with counter:
        their_latents, draws = run_theirs(record=True)
    noise = [n[:batch] for _, n in draws]  # the conditional rows; ours draws no noise for the null rows
    row = {"implementation": "authors", "batch": batch, "precision": "fp32", "compile": "off", "solver": "euler",
           "steps": str(steps),
           "head NFE": len(config.scales) * (len(step_schedule(steps, same_settings["schedule"])) - 1),
           "vs authors' latents": "-", "flops": counter.get_total_flops(), "run": lambda: run_theirs()[0]}
    # Every solver of ours starts each scale from their initial noise (FlowAR draws nothing else).
    return Side(ours, labels, same_settings, row, their_latents, lambda settings: noise)


def xar_side(reference_path: str, timm_path: str | None, preset: str, batch: int, device: torch.device,
             small: bool, steps: int | None = None) -> Side:
    """The authors' xAR ``sample_tokens`` at the preset's cfg and ``steps`` SDE steps per cell (None: the
    preset's), on full-scale random weights (``tools.parity_xar.randomize_``)."""
    modules = parity_xar.import_reference(reference_path, timm_path=timm_path)
    config = parity_xar.reference_config(preset, small=small)
    torch.manual_seed(0)
    theirs = parity_xar.build_reference(modules["xar"], preset, config, small=small)
    parity_xar.randomize_(theirs, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        ours, _ = parity_xar.ours_from_reference(theirs, config, Path(folder))
    theirs.to(device).eval()
    ours.to(device).eval()
    defaults = config.sampling
    cfg, steps = defaults.guidance_scale, defaults.steps if steps is None else steps
    if defaults.solver != "sde" or defaults.cfg_schedule != "linear":
        raise ValueError(f"{preset}'s sampling defaults have no counterpart in the reference sampler")
    if steps < 3:  # with 2, their last step still counts as the first and feeds the previous cell again
        raise ValueError(f"the reference xAR sampler needs at least 3 steps, got {steps}")
    labels = torch.arange(batch, device=device) % config.num_classes

    def run_theirs(record: bool = False):
        with torch.inference_mode():
            latents, noise = parity_xar.sample_reference(modules, theirs, config, labels, cfg=cfg, steps=steps,
                                                         record=record)
        _synchronize(device)
        return latents, noise

    counter = FlopCounterMode(display=False)
    with counter:
        their_latents, noise = run_theirs(record=True)
    row = {"implementation": "authors", "batch": batch, "precision": "fp32", "compile": "off", "solver": "sde",
           "steps": str(steps), "head NFE": config.num_cells * steps, "vs authors' latents": "-",
           "flops": counter.get_total_flops(), "run": lambda: run_theirs()[0]}
    return Side(ours, labels, dict(solver="sde", guidance_scale=cfg, steps=steps), row, their_latents,
                lambda settings: xar_shared_noise(noise, steps, settings))


def xar_shared_noise(noise: list[torch.Tensor], steps: int, settings: dict) -> list[torch.Tensor] | None:
    """The part of the authors' xAR draws that a row of ours with ``settings`` samples from: ``noise`` holds per
    cell (B, steps, c*c, C), the initial noise and then one per SDE step. The SDE at ``steps`` takes it all, an ODE
    solver the initial noise; the SDE on another grid shares no Brownian path with theirs (None)."""
    if settings["solver"] != "sde":
        return [n[:, :1] for n in noise]
    return noise if settings["steps"] == steps else None


@dataclasses.dataclass
class Reference:
    """The authors' code of one family: what its checkout is, how to check one, and its side of the benchmark."""

    name: str
    presets: tuple[str, ...]
    checkout_root: Callable[[str], Path]  # a FileNotFoundError naming --reference unless the folder is one
    side: Callable[..., Side]


REFERENCES = {
    "flowar": Reference("the authors' FlowAR code", tuple(parity_flowar.REFERENCE_MODELS), parity_flowar.checkout_root,
                        flowar_side),
    "xar": Reference("the authors' xAR code", tuple(parity_xar.BUILDERS), parity_xar.checkout_root, xar_side),
}


def reference_family(preset: str) -> str:
    """The family of the authors' code that ``preset`` is timed against; a ValueError names the presets."""
    for family, reference in REFERENCES.items():
        if preset in reference.presets:
            return family
    raise ValueError(f"--reference takes one --preset of {[p for r in REFERENCES.values() for p in r.presets]}, "
                     f"got {preset!r}")


def measure_against_reference(reference_path: str, timm_path: str | None, preset: str, batch: int,
                              variants: list[tuple[str, bool, dict]], options: dict, device_name: str,
                              repeats: int, small: bool = False, reference_steps: int | None = None) -> list[dict]:
    """The authors' fp32 sampler of the preset's family and our ``variants`` ((precision, compiled, option
    overrides) each) on the same weights in this process, interleaved; the first row is theirs. See the module
    docstring. small: both sides in the parity tool's reduced layout (a check of the harness, not a benchmark).
    reference_steps: their sampler's step count (xAR only; None: the preset's)."""
    device = torch.device(device_name)
    side = REFERENCES[reference_family(preset)].side(reference_path, timm_path, preset, batch, device, small,
                                                     reference_steps)
    rows = [side.their_row]
    for precision, compiled, overrides in variants:
        given = {k: v for k, v in family_options(side.ours, options).items() if v is not None}
        settings = {**side.same_settings, **given, **overrides}
        if settings.get("solver") in ADAPTIVE_SOLVERS and "steps" not in overrides:
            settings.pop("steps", None)  # an adaptive solver picks its own steps
        model = side.ours
        if settings.get("solver") == "flow-map":
            # A flow-map head on the same weights (its interval embedding zero at the output, as distillation
            # starts it; its own copy, so compiling it leaves the other rows eager): it costs what a distilled
            # head costs, and its jumps land where as many Euler steps of the released head do.
            model = build_student(side.ours, settings["steps"]).to(device).eval()
        elif compiled:  # a second copy of the same weights, so the eager rows stay eager
            model = type(side.ours)(side.ours.config).to(device).eval()
            model.load_state_dict(side.ours.state_dict())

        generator = torch.Generator(device).manual_seed(1)

        def run_ours(model=model, settings=settings, precision=precision, generator=generator, given_noise=None):
            with torch.inference_mode(), autocast_context(device, PRECISIONS[precision]):
                out = model.sample_with_stats(side.labels, noise=given_noise, generator=generator, **settings)
            _synchronize(device)
            return out

        noise = side.noise_for(settings)
        counter = FlopCounterMode(display=False)
        with counter:
            out = run_ours(given_noise=noise)
        gap = "-" if noise is None else f"{relative_gap(out.latents, side.their_latents):.1e}"
        note = "off"
        if compiled:
            model.compile_for_sampling()
            start = time.perf_counter()
            run_ours()
            note = f"on ({time.perf_counter() - start:.0f} s first call)"
        steps_label = settings.get("steps")
        rows.append({"implementation": "ours", "batch": batch, "precision": precision, "compile": note,
                     "solver": model.sampling_options(**settings).solver,
                     "steps": "/".join(map(str, steps_label)) if isinstance(steps_label, tuple)
                     else "adaptive" if steps_label is None else str(steps_label),
                     "head NFE": out.nfe, "vs authors' latents": gap,
                     "flops": counter.get_total_flops(), "run": lambda run=run_ours: run()})
    return interleaved(rows, batch, repeats)


def relative_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|, in float64."""
    theirs = theirs.double()
    return ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()


def interleaved(rows: list[dict], batch: int, repeats: int) -> list[dict]:
    """Time the rows' ``run`` calls in turn, ``repeats`` rounds, the fastest call of each counting; the table's
    rows, their "flops" and "run" replaced by the speed, the work and the speed against the first row."""
    best = fastest_in_turn([lambda _, run=row["run"]: run() for row in rows], repeats)
    table = []
    for row, seconds in zip(rows, best):
        row = dict(row)
        flops = row.pop("flops")
        row.pop("run")
        table.append({**row, "images/s": batch / seconds, "ms/image": 1000 * seconds / batch,
                      "GFLOP/image": flops / batch / 1e9, "TFLOP/s": flops / seconds / 1e12})
    for row in table:
        row["vs authors"] = "1" if row is table[0] else f"{table[0]['ms/image'] / row['ms/image']:.2f}x"
    return table


def sample_main(argv) -> int:
    p = bench_sample.build_parser(description=__doc__, prog=f"{PROG} sample",
                                  repeats_help="interleaved rounds; the fastest call of each side counts (default 2)")
    add_reference_arguments(p)
    args = p.parse_args(argv)
    s = bench_sample.settings_from_args(p, args, default_repeats=2)
    if len(s.presets) != 1:
        p.error(f"--reference takes one --preset, got {args.preset!r}")
    try:
        family = reference_family(s.presets[0])
    except ValueError as err:
        p.error(str(err))
    reference = REFERENCES[family]
    try:
        reference.checkout_root(args.reference)
    except FileNotFoundError as err:
        p.error(f"{err} (--preset {s.presets[0]} is timed against {reference.name})")
    if args.decode:
        p.error("--reference times the generator only; drop --decode")
    # xAR: their sampler runs the first --steps entry, so a few steps compare like with like. FlowAR: the
    # preset's count (its entries are often per-scale lists or flow-map jumps, which their sampler lacks).
    reference_steps = s.step_settings[0] if family == "xar" else None
    if reference_steps is not None and reference_steps < 3:
        p.error(f"--steps: the authors' xAR sampler runs the first entry, which must be >= 3 (with 2, their last step "
                f"still counts as the first); got {args.steps!r}")
    peaks = bench_sample.print_header(s, args.batch, False, f"{s.repeats} interleaved rounds")
    variants = [(precision, compiled, axis_options(steps, solver))
                for solver in s.solvers for steps in s.step_settings
                for precision in s.precisions for compiled in s.compiles]
    rows = []
    for batch in s.batches:
        rows += run_isolated(measure_against_reference, args.reference, args.timm_path, s.presets[0], batch,
                             variants, s.options, str(s.device), s.repeats, args.small, reference_steps)
    add_peak_share(rows, peaks)
    for row in rows:  # the speed ratio last
        row["vs authors"] = row.pop("vs authors")
    print(format_table(rows))
    for batch in s.batches:
        base, *group = [r for r in rows if r["batch"] == batch]
        print(f"batch {batch}, speed against the authors' fp32: " + ", ".join(
            f"{r['precision']}{' compiled' if r['compile'] != 'off' else ''}"
            f"{' ' + r['solver'] if len(s.solvers) > 1 else ''} {r['steps']} steps "
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
        with parity_flowar.cuda_calls_as_noop():
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
    modules = parity_flowar.import_reference(reference_path, timm_path=timm_path)
    config = parity_flowar.reference_config(preset, small=small)
    torch.manual_seed(0)
    theirs = parity_flowar.build_reference(modules["flowar"], preset, config, small=small).to(device).train()
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
    ours = [parity_flowar.ours_from_reference(theirs, dataclasses.replace(config, grad_checkpointing=checkpointing))[0]
            for _, _, checkpointing in variants]
    step = their_step(theirs, config, batch, device)
    entries = [("authors", "fp32", "off", False, step, count_and_compile(step, theirs, False)[0])]
    for model, (precision, compiled, checkpointing) in zip(ours, variants):
        model.to(device).train()
        step = our_step(model, batch, precision, device)
        flops, note = count_and_compile(step, model, compiled)
        entries.append(("ours", precision, note, checkpointing, step, flops))
    calls = [lambda _, run=entry[4]: run() for entry in entries]
    fastest_in_turn(calls, warmup)  # warm-up rounds, the entries in turn as in the timed ones
    best = fastest_in_turn(calls, steps)
    return [row_of(name, precision, note, checkpointing, batch, seconds, flops, None)
            for (name, precision, note, checkpointing, _, flops), seconds in zip(entries, best)]


def train_main(argv) -> int:
    p = train_bench.build_parser(description=__doc__, prog=f"{PROG} train")
    add_reference_arguments(p)
    args = p.parse_args(argv)
    s = train_bench.settings_from_args(p, args)
    if s.demos:
        p.error("--demo: the authors' step is timed beside a --preset's, not beside the demo's models")
    if s.preset not in parity_flowar.REFERENCE_MODELS:
        p.error(f"--reference takes a --preset of {sorted(parity_flowar.REFERENCE_MODELS)}, got {s.preset!r}")
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
