"""Sampling benchmark for FlowAR, xAR, the VAR baseline and FlexVAR: images/s, ms per image, forward passes,
peak memory and achieved TFLOP/s, every row measured in the same run.

    python eval/bench_sample.py --preset flowar-s --batch 4
    python eval/bench_sample.py --preset flowar-s --batch 4 --precision fp32,bf16     # precisions side by side
    python eval/bench_sample.py --preset flowar-s,var-d16 --batch 4                  # FlowAR beside VAR
    python eval/bench_sample.py --preset flowar-s,var-d16 --batch 4 --decode         # ... up to pixels
    python eval/bench_sample.py --preset flowar-s,flowar-s-multistage --batch 4      # E-CAR's multistage flow
    python eval/bench_sample.py --preset flowar-s --batch 4 --compile off,on         # torch.compile side by side
    python eval/bench_sample.py --preset flowar-s --batch 1,4,16,64 --precision bf16  # batch scaling
    python eval/bench_sample.py --preset flowar-s --batch 2 --steps 25,25/17/13/9/7  # fewer steps per scale
    python eval/bench_sample.py --preset xar-b --batch 2 --solver sde,euler --steps 40,20  # xAR's SDE and ODE

Weights are random (the architecture, not the checkpoint, sets the cost). Timed is the generator up to its
final latent: FlowAR's cached transformer pass per scale and the flow head's ODE; xAR's transformer as the
velocity of each cell's flow (every evaluation a pass over the cell, reading the cache of the clean cells
before it, plus one pass feeding each clean cell); VAR's and FlexVAR's cached pass per scale, their token
sampling and the tokenizer's work between scales. ``--decode`` adds each model's released decoder (FlowAR and
xAR: MAR's KL-16; VAR: ``vae_ch160v4096z32``; FlexVAR: FlexVAE). Each model samples with its own defaults
(FlowAR-S: guidance scale 4.3, 25 Euler steps; xAR-B: guidance 2.7 ramped over the cells, 40 SDE steps per
cell; VAR: guidance scale 2.5 = VAR's cfg 1.5, top-k 900, top-p 0.96), so all run the guided batch. FLOPs are counted once per row with ``torch.utils.flop_counter`` on an identical call; the
timed calls run without the counter. Each row runs in its own spawned process, so its peak memory (CUDA:
max allocated; CPU: peak RSS) is its own. "% peak" divides a row's TFLOP/s by the machine's own rate on a
2048-square matmul in the row's precision, measured at the start of the run (``eval.machine``).

``--steps`` is an axis: a comma list whose entries are one count for every scale (xAR: every cell) or
a/b/c/... per scale (FlowAR). ``--solver`` is one too: FlowAR's ODE solvers (and "flow-map"), xAR's "sde" (its
released sampler) or one of the same ODE solvers; a preset whose options refuse an entry is an error before
anything runs. "passes" counts transformer passes, "head NFE" the evaluations of the velocity (xAR's
transformer is its own head, so its passes are its evaluations plus one feed of each clean cell).

Timing the authors' FlowAR or xAR sampler beside ours is a maintainer tool of the repository, not part of the
package: ``python -m tools.bench_reference sample --reference PATH [these options]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval.machine import device_label, matmul_peak_tflops
from eval.sweep import parse_steps
from flowar import (FLEXVAR_PRESETS, PRESETS, VAR_PRESETS, XAR_PRESETS, XAR, FlexVAR, FlowAR, VAR,
                    get_flexvar_preset, get_preset, get_var_preset, get_xar_preset)
from flowar.outputs import PRECISIONS, autocast_context
from flowar.xar_config import XAR_SOLVERS
from heads.solvers import SCHEDULES, SOLVERS

# Each family: its presets, its model class and the getter of a preset's config.
FAMILIES = {
    "flowar": (PRESETS, FlowAR, get_preset),
    "xar": (XAR_PRESETS, XAR, get_xar_preset),
    "var": (VAR_PRESETS, VAR, get_var_preset),
    "flexvar": (FLEXVAR_PRESETS, FlexVAR, get_flexvar_preset),
}
# The solvers of the families that integrate a flow; the token families take none.
FAMILY_SOLVERS = {"flowar": SOLVERS, "xar": XAR_SOLVERS}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _call_in_child(queue, fn, args):
    try:
        queue.put(fn(*args))
    except BaseException as err:  # report, don't leave the parent waiting
        queue.put(err)


def run_isolated(fn, *args):
    """``fn(*args)`` in a fresh spawned process (``fn`` must be importable), so peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_call_in_child, args=(queue, fn, args))
    child.start()
    result = queue.get()
    child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def preset_family(preset: str) -> str:
    """The family ("flowar", "xar", "var", "flexvar") whose presets hold ``preset``."""
    for family, (presets, _, _) in FAMILIES.items():
        if preset in presets:
            return family
    raise ValueError(f"preset must be one of {sorted(name for presets, _, _ in FAMILIES.values() for name in presets)}, "
                     f"got {preset!r}")


def preset_config(preset: str, options: dict):
    """The config of ``preset`` that a row with ``options`` samples with: FlowAR's "flow-map" solver needs a
    flow-map head (random weights cost what a distilled head costs)."""
    family = preset_family(preset)
    if family == "flowar":
        return get_preset(preset, flow_map=options.get("solver") == "flow-map")
    return FAMILIES[family][2](preset)


def matching_tokenizer(preset: str):
    """The tokenizer config that the VAR or FlexVAR preset was built for: VAR's multi-scale VQ with its scales,
    codebook and code size (``vae_ch160v4096z32`` for the released ones), FlexVAR's with its codebook and code
    size (FlexVAE for the released ones)."""
    if preset_family(preset) == "flexvar":
        from vae.flexvq import FLEXVQ_PRESETS

        c = get_flexvar_preset(preset)
        matches = [config for config in FLEXVQ_PRESETS.values()
                   if (config.codebook_size, config.code_dim) == (c.vocab_size, c.code_dim)]
        what = f"V {c.vocab_size}, code_dim {c.code_dim}"
    else:
        from vae.msvq import MSVQ_PRESETS

        c = get_var_preset(preset)
        matches = [config for config in MSVQ_PRESETS.values()
                   if (tuple(config.scales), config.codebook_size, config.code_dim) == (c.scales, c.vocab_size, c.code_dim)]
        what = f"scales {c.scales}, V {c.vocab_size}, code_dim {c.code_dim}"
    if not matches:
        raise ValueError(f"no tokenizer preset matches {preset} ({what})")
    return matches[0]


def family_options(model, options: dict) -> dict:
    """The options of ``options`` that ``model``'s family has (its sampling dataclass's fields, and VAR's
    var_cfg), so one command line serves every family's rows."""
    names = {f.name for f in dataclasses.fields(model.sampling_class)} | ({"var_cfg"} if hasattr(model.sampling_class, "var_cfg") else set())
    return {k: v for k, v in options.items() if k in names}


def transformer_passes(model, out) -> int:
    """The transformer passes of one sampling call: FlowAR's one cached pass per scale; xAR's transformer is the
    velocity itself, so every evaluation, plus the pass feeding each clean cell before the next."""
    if isinstance(model, XAR):
        return out.nfe + model.config.num_cells - 1
    return len(model.config.scales)


def build_sampler(preset: str, options: dict, device: torch.device, decode: bool):
    """The model of ``preset`` with random weights, ``sample(labels, generator)`` -> (images or latents, counts),
    its parameter count (decoder included only when it runs) and the solver its rows run ("-" for the token
    families)."""
    torch.manual_seed(0)
    family = preset_family(preset)
    model = FAMILIES[family][1](preset_config(preset, options)).to(device).eval()
    kwargs = family_options(model, options)
    if family in ("var", "flexvar"):
        if family == "var":
            from vae.msvq import MultiScaleVQVAE as Tokenizer
        else:
            from vae.flexvq import FlexVQVAE as Tokenizer

        tokenizer = Tokenizer(matching_tokenizer(preset)).to(device).eval()
        if not decode:  # only the quantiser (codebook and the layers between scales) takes part
            tokenizer.encoder = tokenizer.decoder = None

        def sample(labels, generator):
            out = model.sample(labels, tokenizer=tokenizer, generator=generator, **kwargs)
            result = tokenizer.decode(out.decoder_input) if decode else out.decoder_input
            return result, {"passes": len(out.indices), "head NFE": "-", "head rows/image": "-"}

        parts = [model] + ([tokenizer.post_quant_conv, tokenizer.decoder] if decode else [])
        solver = "-"
    else:
        vae = None
        if decode:
            from diffusers import AutoencoderKL

            from vae.diffusers_vae import DiffusersVAE
            from vae.mar_kl16 import mar_kl16_config

            if model.config.token_dim != 16:
                raise ValueError(f"--decode needs a KL-16 preset (token_dim 16), {preset} has {model.config.token_dim}")
            vae = DiffusersVAE(AutoencoderKL(**mar_kl16_config())).to(device).eval()

        def sample(labels, generator):
            out = model.sample_with_stats(labels, generator=generator, **kwargs)
            result = vae.decode(out.latents.to(vae.dtype)) if decode else out.latents
            return result, {"passes": transformer_passes(model, out), "head NFE": out.nfe,
                            "head rows/image": out.head_rows / out.latents.shape[0]}

        parts = [model] + ([vae.autoencoder.post_quant_conv, vae.autoencoder.decoder] if decode else [])
        solver = model.sampling_options(**kwargs).solver
    params = sum(p.numel() for part in parts for p in part.parameters())
    return model, sample, params, solver


def measure(preset: str, batch: int, precision: str, device_name: str, options: dict, decode: bool,
            warmup: int, repeats: int, compiled: bool = False) -> dict:
    """One row: ``repeats`` timed sampling calls (the fastest counts) after ``warmup`` untimed ones. Compiled
    (``ScaleWiseModel.compile_for_sampling``): FLOPs are counted on the eager model first (the same
    arithmetic), then one more untimed call compiles; its time is reported as the compile cost."""
    device = torch.device(device_name)
    model, sample, params, solver = build_sampler(preset, options, device, decode)
    num_classes = model.config.num_classes
    labels = torch.arange(batch, device=device) % num_classes if num_classes else None

    def once(seed):
        generator = torch.Generator(device).manual_seed(seed)
        with torch.inference_mode(), autocast_context(device, PRECISIONS[precision]):
            result, counts = sample(labels, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not torch.isfinite(result).all():
            raise FloatingPointError(f"{preset} {precision} sampled non-finite values")
        return counts

    counter = FlopCounterMode(display=False)
    with counter:
        counts = once(0)
    flops = counter.get_total_flops()
    compile_note = "off"
    if compiled:
        model.compile_for_sampling()
        start = time.perf_counter()
        once(0)
        compile_note = f"on ({time.perf_counter() - start:.0f} s first call)"
    for i in range(warmup):
        once(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        once(100 + i)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    steps = options.get("steps")
    return {
        "preset": preset,
        "batch": batch,
        "steps": "/".join(map(str, steps)) if isinstance(steps, tuple) else ("default" if steps is None else str(steps)),
        "solver": solver,
        "params (M)": params / 1e6,
        "precision": precision,
        "compile": compile_note,
        "images/s": batch / seconds,
        "ms/image": 1000 * seconds / batch,
        **counts,
        "peak MiB": peak_memory_mib(device),
        "GFLOP/image": flops / batch / 1e9,
        "TFLOP/s": flops / seconds / 1e12,
    }


def add_peak_share(rows, peaks: dict[str, float]) -> None:
    """Each row's TFLOP/s as a share of the machine's matmul rate in the row's precision."""
    for row in rows:
        row["% peak"] = 100 * row["TFLOP/s"] / peaks[row["precision"]]


def format_table(rows) -> str:
    cols = list(rows[0])
    fmt = {"params (M)": "{:.1f}", "images/s": "{:.3f}", "ms/image": "{:.0f}", "ms/step": "{:.0f}",
           "peak MiB": "{:.0f}", "GFLOP/image": "{:.1f}", "TFLOP/s": "{:.3f}", "% peak": "{:.0f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(row[c]) if isinstance(row[c], (int, float))
                                       else str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def comma_list(p: argparse.ArgumentParser, name: str, value: str, allowed) -> list[str]:
    """Split a comma list and check every item, naming the argument on error."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        p.error(f"{name} must name at least one of {sorted(allowed)}")
    for item in items:
        if item not in allowed:
            p.error(f"{name} must be a comma list of {sorted(allowed)}, got {item!r}")
    return items


@dataclasses.dataclass
class Settings:
    """A parsed, checked command line: the axes of the table and what every row shares."""
    presets: list[str]
    batches: list[int]
    precisions: list[str]
    compiles: list[bool]
    step_settings: list  # None (the preset's), a count, or a tuple of counts per scale
    solvers: list  # None (the preset's) or a solver's name
    device: torch.device
    warmup: int
    repeats: int
    options: dict  # the sampling options given (None: each preset's default)


def build_parser(description: str = __doc__, prog: str | None = None,
                 repeats_help: str = "timed calls; the fastest is reported (default 1)") -> argparse.ArgumentParser:
    """The benchmark's options, on a parser that a caller may extend with its own."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flowar-s", help="comma list of FlowAR, xAR, VAR and FlexVAR presets: "
                   + ", ".join(name for presets, _, _ in FAMILIES.values() for name in sorted(presets)))
    p.add_argument("--batch", default="4", help="comma list of images per sampling call, e.g. 1,4,16,64")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--decode", action="store_true", help="time the decoder to pixels too")
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the hot modules "
                   "(ScaleWiseModel.compile_for_sampling); the first call's time is reported, not counted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 0 on CPU, 2 on GPU)")
    p.add_argument("--repeats", type=int, default=None, help=repeats_help)
    flow_args = p.add_argument_group("FlowAR and xAR sampling (default: the preset's)")
    flow_args.add_argument("--steps", default=None,
                           help="comma list of step counts, each one for every scale (xAR: cell) or a/b/c/... per "
                                "scale (FlowAR)")
    p.add_argument("--guidance-scale", type=float, default=None, help="every family; 1 is unguided")
    flow_args.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                           help="FlowAR only")
    flow_args.add_argument("--solver", default=None,
                           help=f"comma list of solvers: FlowAR's {', '.join(SOLVERS)}; xAR's {', '.join(XAR_SOLVERS)}")
    flow_args.add_argument("--schedule", default=None, choices=SCHEDULES, help="FlowAR only")
    var_args = p.add_argument_group("VAR sampling (default: the preset's)")
    var_args.add_argument("--var-cfg", type=float, default=None, help="VAR guidance in its own convention; 0 is unguided")
    var_args.add_argument("--top-k", type=int, default=None)
    var_args.add_argument("--top-p", type=float, default=None)
    return p


def settings_from_args(p: argparse.ArgumentParser, args: argparse.Namespace, default_repeats: int = 1) -> Settings:
    """Split and check ``args`` (errors name the argument through ``p``)."""
    presets = comma_list(p, "--preset", args.preset, {name for presets, _, _ in FAMILIES.values() for name in presets})
    precisions = comma_list(p, "--precision", args.precision, PRECISIONS)
    compiles = comma_list(p, "--compile", args.compile, {"off": False, "on": True})
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
        step_settings = parse_steps(args.steps) if args.steps else [None]
    except ValueError as err:
        p.error(str(err) if args.steps and "--steps" in str(err) else
                f"--batch must be a comma list of integers, got {args.batch!r}")
    if not batches or min(batches) < 1:
        p.error(f"--batch must be a comma list of integers >= 1, got {args.batch!r}")
    if args.steps and (not step_settings or any(min(s if isinstance(s, tuple) else (s,)) < 1 for s in step_settings)):
        p.error(f"--steps must be counts >= 1, got {args.steps!r}")
    repeats = args.repeats if args.repeats is not None else default_repeats
    if repeats < 1 or (args.warmup is not None and args.warmup < 0):
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {args.warmup}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device")
    warmup = (2 if device.type == "cuda" else 0) if args.warmup is None else args.warmup
    solvers = comma_list(p, "--solver", args.solver, set(SOLVERS) | set(XAR_SOLVERS)) if args.solver else [None]
    options = {"guidance_scale": args.guidance_scale, "schedule": args.schedule,
               "guidance_interval": args.guidance_interval, "var_cfg": args.var_cfg, "top_k": args.top_k,
               "top_p": args.top_p}
    for preset in presets:  # every row's options, checked before any process starts
        family = preset_family(preset)
        if family not in FAMILY_SOLVERS:
            continue
        for solver in solvers:
            if solver is not None and solver not in FAMILY_SOLVERS[family]:
                p.error(f"--solver {solver!r} is not a solver of {preset}; its solvers are {list(FAMILY_SOLVERS[family])}")
            for steps in step_settings:
                check_row_options(p, preset, {**options, **axis_options(steps, solver)})
    return Settings(presets, batches, precisions, [c == "on" for c in compiles], step_settings, solvers, device,
                    warmup, repeats, options)


def axis_options(steps=None, solver=None) -> dict:
    """The sampling overrides of one ``--steps`` entry and one ``--solver`` entry (None: the preset's own)."""
    return {name: value for name, value in (("steps", steps), ("solver", solver)) if value is not None}


def flow_axes(settings: Settings, preset: str) -> list[tuple]:
    """The (solver, steps) entries that ``preset``'s rows cross: every pair for FlowAR and xAR; the token
    families, which have neither, run once."""
    if preset_family(preset) not in FAMILY_SOLVERS:
        return [(None, None)]
    return [(solver, steps) for solver in settings.solvers for steps in settings.step_settings]


def check_row_options(p: argparse.ArgumentParser, preset: str, options: dict) -> None:
    """Exit through ``p``, naming the flags, when ``preset``'s sampling options refuse ``options``."""
    config = preset_config(preset, options)
    fields = {f.name for f in dataclasses.fields(type(config.sampling))}
    given = {k: v for k, v in options.items() if v is not None and k in fields}
    try:
        config.sampling.replace(**given).check_model(config)
    except ValueError as err:
        flags = " ".join(f"--{k.replace('_', '-')} " + ("/".join(map(str, v)) if k == "steps" and isinstance(v, tuple)
                                                         else " ".join(map(str, v)) if isinstance(v, (tuple, list))
                                                         else str(v)) for k, v in given.items())
        p.error(f"--preset {preset} does not take {flags}: {err}")


def print_header(settings: Settings, batch: str, decode: bool, timing: str) -> dict[str, float]:
    """Print what the run measures and on what, and return the machine's matmul rate per precision."""
    device = settings.device
    where = device_label(device)
    peaks = {name: matmul_peak_tflops(dtype or torch.float32, device) for name, dtype in PRECISIONS.items()}
    print(f"sampling batch {batch}{' to pixels' if decode else ''}, device {device} [{where}], "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {timing}")
    print("measured matmul peak (2048-square): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()))
    return peaks


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    s = settings_from_args(p, args)
    peaks = print_header(s, args.batch, args.decode, f"{s.warmup} warm-up + {s.repeats} timed")
    rows = [run_isolated(measure, preset, batch, precision, str(s.device), {**s.options, **axis_options(steps, solver)},
                         args.decode, s.warmup, s.repeats, compiled)
            for preset in s.presets for batch in s.batches for solver, steps in flow_axes(s, preset)
            for precision in s.precisions for compiled in s.compiles]
    add_peak_share(rows, peaks)
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return (row["preset"] + (f" batch {row['batch']}" if len(s.batches) > 1 else "") + f" {row['precision']}"
                    + (f" {row['solver']}" if len(s.solvers) > 1 and row["solver"] != "-" else "")
                    + (f" {row['steps']} steps" if len(s.step_settings) > 1 else "")
                    + (" compiled" if row["compile"] != "off" else ""))

        print(f"images/s relative to {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
        print(f"GFLOP/image relative to {name(base)}: " +
              ", ".join(f"{name(r)} {r['GFLOP/image'] / base['GFLOP/image']:.2f}x" for r in rows[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
