"""Sampling benchmark for FlowAR and the VAR baseline: images/s, ms per image, forward passes, peak memory
and achieved TFLOP/s, every row measured in the same run.

    python eval/bench_sample.py --preset flowar-s --batch 4
    python eval/bench_sample.py --preset flowar-s --batch 4 --precision fp32,bf16     # precisions side by side
    python eval/bench_sample.py --preset flowar-s,var-d16 --batch 4                  # FlowAR beside VAR
    python eval/bench_sample.py --preset flowar-s,var-d16 --batch 4 --decode         # ... up to pixels
    python eval/bench_sample.py --preset flowar-s,flowar-s-multistage --batch 4      # E-CAR's multistage flow
    python eval/bench_sample.py --preset flowar-s --batch 4 --compile off,on         # torch.compile side by side
    python eval/bench_sample.py --preset flowar-s --batch 1,4,16,64 --precision bf16  # batch scaling
    python eval/bench_sample.py --preset flowar-s --batch 2 --steps 25,25/17/13/9/7  # fewer steps per scale

Weights are random (the architecture, not the checkpoint, sets the cost). Timed is the generator up to its
final latent: FlowAR's cached transformer pass per scale and the flow head's ODE; VAR's cached pass per
scale, its token sampling and the tokenizer's ``f_hat`` accumulation. ``--decode`` adds each model's
released decoder (FlowAR: MAR's KL-16; VAR: ``vae_ch160v4096z32``). Each model samples with its own
defaults (FlowAR-S: guidance scale 4.3, 25 Euler steps; VAR: guidance scale 2.5 = VAR's cfg 1.5, top-k 900,
top-p 0.96), so both run the
guided batch. FLOPs are counted once per row with ``torch.utils.flop_counter`` on an identical call; the
timed calls run without the counter. Each row runs in its own spawned process, so its peak memory (CUDA:
max allocated; CPU: peak RSS) is its own. "% peak" divides a row's TFLOP/s by the machine's own rate on a
2048-square matmul in the row's precision, measured at the start of the run (``eval.machine``).

``--steps`` is an axis: a comma list whose entries are one count for every scale or a/b/c/... per scale.

Timing the authors' FlowAR sampler beside ours is a maintainer tool of the repository, not part of the
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
from flowar import PRESETS, VAR_PRESETS, FlowAR, VAR, get_preset, get_var_preset
from flowar.outputs import PRECISIONS, autocast_context
from heads.solvers import SCHEDULES, SOLVERS


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


def matching_tokenizer(preset: str):
    """The tokenizer preset whose scales, codebook and code size the VAR preset was built for
    (``vae_ch160v4096z32`` for the released ones)."""
    from vae.msvq import MSVQ_PRESETS

    c = get_var_preset(preset)
    for config in MSVQ_PRESETS.values():
        if (tuple(config.scales), config.codebook_size, config.code_dim) == (c.scales, c.vocab_size, c.code_dim):
            return config
    raise ValueError(f"no tokenizer preset matches {preset} (scales {c.scales}, V {c.vocab_size}, "
                     f"code_dim {c.code_dim})")


def family_options(model, options: dict) -> dict:
    """The options of ``options`` that ``model``'s family has (its sampling dataclass's fields, and VAR's
    var_cfg), so one command line serves FlowAR and VAR rows."""
    names = {f.name for f in dataclasses.fields(model.sampling_class)} | ({"var_cfg"} if hasattr(model.sampling_class, "var_cfg") else set())
    return {k: v for k, v in options.items() if k in names}


def build_sampler(preset: str, options: dict, device: torch.device, decode: bool):
    """The model of ``preset`` with random weights and ``sample(labels, generator)`` -> (images or latents,
    counts), plus its parameter count (decoder included only when it runs)."""
    torch.manual_seed(0)
    if preset in VAR_PRESETS:
        from vae.msvq import MultiScaleVQVAE

        model = VAR(get_var_preset(preset)).to(device).eval()
        tokenizer = MultiScaleVQVAE(matching_tokenizer(preset)).to(device).eval()
        if not decode:  # only the quantiser (codebook and phi convs) takes part
            tokenizer.encoder = tokenizer.decoder = None
        kwargs = family_options(model, options)

        def sample(labels, generator):
            out = model.sample(labels, tokenizer=tokenizer, generator=generator, **kwargs)
            result = tokenizer.decode_f_hat(out.f_hat) if decode else out.f_hat
            return result, {"passes": len(model.config.scales), "head NFE": "-", "head rows/image": "-"}

        parts = [model] + ([tokenizer.post_quant_conv, tokenizer.decoder] if decode else [])
    else:
        # The "flow-map" solver needs a flow-map head; random weights cost what a distilled head costs.
        model = FlowAR(get_preset(preset, flow_map=options.get("solver") == "flow-map")).to(device).eval()
        kwargs = family_options(model, options)
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
            return result, {"passes": len(model.config.scales), "head NFE": out.nfe,
                            "head rows/image": out.head_rows / out.latents.shape[0]}

        parts = [model] + ([vae.autoencoder.post_quant_conv, vae.autoencoder.decoder] if decode else [])
    params = sum(p.numel() for part in parts for p in part.parameters())
    return model, sample, params


def measure(preset: str, batch: int, precision: str, device_name: str, options: dict, decode: bool,
            warmup: int, repeats: int, compiled: bool = False) -> dict:
    """One row: ``repeats`` timed sampling calls (the fastest counts) after ``warmup`` untimed ones. Compiled
    (``ScaleWiseModel.compile_for_sampling``): FLOPs are counted on the eager model first (the same
    arithmetic), then one more untimed call compiles; its time is reported as the compile cost."""
    device = torch.device(device_name)
    model, sample, params = build_sampler(preset, options, device, decode)
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
    device: torch.device
    warmup: int
    repeats: int
    options: dict  # the sampling options given (None: each preset's default)


def build_parser(description: str = __doc__, prog: str | None = None,
                 repeats_help: str = "timed calls; the fastest is reported (default 1)") -> argparse.ArgumentParser:
    """The benchmark's options, on a parser that a caller may extend with its own."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flowar-s", help="comma list of FlowAR and VAR presets: "
                   + ", ".join(sorted(PRESETS) + sorted(VAR_PRESETS)))
    p.add_argument("--batch", default="4", help="comma list of images per sampling call, e.g. 1,4,16,64")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--decode", action="store_true", help="time the decoder to pixels too")
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the hot modules "
                   "(ScaleWiseModel.compile_for_sampling); the first call's time is reported, not counted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 0 on CPU, 2 on GPU)")
    p.add_argument("--repeats", type=int, default=None, help=repeats_help)
    flowar_args = p.add_argument_group("FlowAR sampling (default: the preset's)")
    flowar_args.add_argument("--steps", default=None,
                             help="comma list of step counts, each one for every scale or a/b/c/... per scale")
    p.add_argument("--guidance-scale", type=float, default=None, help="both families; 1 is unguided")
    flowar_args.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    flowar_args.add_argument("--solver", default=None, choices=SOLVERS)
    flowar_args.add_argument("--schedule", default=None, choices=SCHEDULES)
    var_args = p.add_argument_group("VAR sampling (default: the preset's)")
    var_args.add_argument("--var-cfg", type=float, default=None, help="VAR guidance in its own convention; 0 is unguided")
    var_args.add_argument("--top-k", type=int, default=None)
    var_args.add_argument("--top-p", type=float, default=None)
    return p


def settings_from_args(p: argparse.ArgumentParser, args: argparse.Namespace, default_repeats: int = 1) -> Settings:
    """Split and check ``args`` (errors name the argument through ``p``)."""
    presets = comma_list(p, "--preset", args.preset, {**PRESETS, **VAR_PRESETS})
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
    options = {"guidance_scale": args.guidance_scale, "solver": args.solver, "schedule": args.schedule,
               "guidance_interval": args.guidance_interval, "var_cfg": args.var_cfg, "top_k": args.top_k,
               "top_p": args.top_p}
    return Settings(presets, batches, precisions, [c == "on" for c in compiles], step_settings, device, warmup,
                    repeats, options)


def steps_options(steps) -> dict:
    """The sampling override of one ``--steps`` entry (None: the preset's own)."""
    return {} if steps is None else {"steps": steps}


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
    rows = [run_isolated(measure, preset, batch, precision, str(s.device), {**s.options, **steps_options(steps)},
                         args.decode, s.warmup, s.repeats, compiled)
            for preset in s.presets for batch in s.batches for steps in s.step_settings
            for precision in s.precisions for compiled in s.compiles]
    add_peak_share(rows, peaks)
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return (row["preset"] + (f" batch {row['batch']}" if len(s.batches) > 1 else "") + f" {row['precision']}"
                    + (f" {row['steps']} steps" if len(s.step_settings) > 1 else "")
                    + (" compiled" if row["compile"] != "off" else ""))

        print(f"images/s relative to {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
        print(f"GFLOP/image relative to {name(base)}: " +
              ", ".join(f"{name(r)} {r['GFLOP/image'] / base['GFLOP/image']:.2f}x" for r in rows[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
