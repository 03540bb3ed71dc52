"""Sampling benchmark for FlowAR and the VAR baseline: images/s, ms per image, forward passes, peak memory
and achieved TFLOP/s, every row measured in the same run.

    python eval/bench_sample.py --preset flowar-s --batch 4
    python eval/bench_sample.py --preset flowar-s --batch 4 --precision fp32,bf16     # precisions side by side
    python eval/bench_sample.py --preset flowar-s,var-d16 --batch 4                  # FlowAR beside VAR
    python eval/bench_sample.py --preset flowar-s,var-d16 --batch 4 --decode         # ... up to pixels
    python eval/bench_sample.py --preset flowar-s,flowar-s-multistage --batch 4      # E-CAR's multistage flow
    python eval/bench_sample.py --preset flowar-s --batch 4 --compile off,on         # torch.compile side by side
    python eval/bench_sample.py --preset flowar-s --batch 1,4,16,64 --precision bf16  # batch scaling
    python eval/bench_sample.py --preset flowar-s --batch 2 --precision fp32,bf16 --steps 25,25/17/13/9/7 \
        --reference /path/to/FlowAR --timm-path /tmp/timm_pkg                          # against the authors' code

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

``--reference PATH`` (a checkout of the authors' code, imported as ``eval/parity_flowar.py`` does) times
their FlowAR ``sample_tokens`` in fp32, as released, against our rows on the same weights, all in one
process: every round calls each side once in turn, and the fastest call of each counts. Their sampler runs
the preset's settings (its cfg, guidance interval and step count; FlowAR-S: 25 points, 24 Euler steps per
scale). Before timing, each of our rows samples from their first call's initial noise, and the table
gives how far its latents lie from theirs (max |ours - theirs| / max |theirs|): fp32 at the same steps
must agree to float precision; bf16 or fewer steps show what they change. Peak memory is not given in this
mode (one process holds both models).
"""

from __future__ import annotations

import argparse
import contextlib
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
from heads.solvers import SCHEDULES, SOLVERS, step_schedule



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
        model = FlowAR(get_preset(preset)).to(device).eval()
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


def measure_against_reference(reference_path: str, timm_path: str | None, preset: str, batch: int,
                              variants: list[tuple[str, bool, dict]], options: dict, device_name: str,
                              repeats: int, small: bool = False) -> list[dict]:
    """The authors' fp32 sampler and our ``variants`` ((precision, compiled, option overrides) each) on the
    same weights in this process, interleaved; the first row is theirs. See the module docstring. small:
    both sides in ``eval/parity_flowar.py``'s reduced layout (a check of the harness, not a benchmark)."""
    from eval import parity_flowar as parity

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
        if compiled:  # a second copy of the same weights, so the eager rows stay eager
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flowar-s", help="comma list of FlowAR and VAR presets: "
                   + ", ".join(sorted(PRESETS) + sorted(VAR_PRESETS)))
    p.add_argument("--batch", default="4", help="comma list of images per sampling call, e.g. 1,4,16,64")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--decode", action="store_true", help="time the decoder to pixels too")
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the hot modules "
                   "(ScaleWiseModel.compile_for_sampling); the first call's time is reported, not counted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 0 on CPU, 2 on GPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls (rounds with --reference); the fastest is reported (default 1; 2 with --reference)")
    p.add_argument("--reference", default=None, help="checkout of the authors' FlowAR code: time their fp32 "
                   "sampler against ours on the same weights, in one process (FlowAR-S/L/H presets)")
    p.add_argument("--timm-path", default=None, help="with --reference: folder holding timm, if not installed")
    p.add_argument("--small", action="store_true", help="with --reference: both sides in parity_flowar.py's "
                   "reduced layout, to check the harness in seconds (not a benchmark)")
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
    args = p.parse_args(argv)
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
    repeats = args.repeats if args.repeats is not None else (2 if args.reference else 1)
    if repeats < 1 or (args.warmup is not None and args.warmup < 0):
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {args.warmup}")
    if args.reference is not None:
        from eval.parity_flowar import REFERENCE_MODELS

        if len(presets) != 1 or presets[0] not in REFERENCE_MODELS:
            p.error(f"--reference takes one --preset of {sorted(REFERENCE_MODELS)}, got {args.preset!r}")
        if args.decode:
            p.error("--reference times the generator only; drop --decode")
    elif args.timm_path is not None or args.small:
        p.error("--timm-path and --small are used only with --reference")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device")
    warmup = (2 if device.type == "cuda" else 0) if args.warmup is None else args.warmup
    options = {"guidance_scale": args.guidance_scale, "solver": args.solver, "schedule": args.schedule,
               "guidance_interval": args.guidance_interval, "var_cfg": args.var_cfg, "top_k": args.top_k,
               "top_p": args.top_p}
    where = device_label(device)
    peaks = {name: matmul_peak_tflops(dtype or torch.float32, device) for name, dtype in PRECISIONS.items()}
    print(f"sampling batch {args.batch}{' to pixels' if args.decode else ''}, device {device} [{where}], "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          + (f"{repeats} interleaved rounds" if args.reference else f"{warmup} warm-up + {repeats} timed"))
    print("measured matmul peak (2048-square): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()))

    def steps_options(steps):
        return {} if steps is None else {"steps": steps}

    if args.reference is not None:
        variants = [(precision, compiled == "on", steps_options(steps))
                    for steps in step_settings for precision in precisions for compiled in compiles]
        rows = []
        for batch in batches:
            rows += run_isolated(measure_against_reference, args.reference, args.timm_path, presets[0], batch,
                                 variants, options, str(device), repeats, args.small)
        add_peak_share(rows, peaks)
        print(format_table(rows))
        for batch in batches:
            base, *group = [r for r in rows if r["batch"] == batch]
            print(f"batch {batch}, speed against the authors' fp32: " + ", ".join(
                f"{r['precision']}{' compiled' if r['compile'] != 'off' else ''} {r['steps']} steps "
                f"{r['images/s'] / base['images/s']:.2f}x" for r in group))
        return 0

    rows = [run_isolated(measure, preset, batch, precision, str(device), {**options, **steps_options(steps)},
                         args.decode, warmup, repeats, compiled == "on")
            for preset in presets for batch in batches for steps in step_settings
            for precision in precisions for compiled in compiles]
    add_peak_share(rows, peaks)
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return (row["preset"] + (f" batch {row['batch']}" if len(batches) > 1 else "") + f" {row['precision']}"
                    + (f" {row['steps']} steps" if len(step_settings) > 1 else "")
                    + (" compiled" if row["compile"] != "off" else ""))

        print(f"images/s relative to {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
        print(f"GFLOP/image relative to {name(base)}: " +
              ", ".join(f"{name(r)} {r['GFLOP/image'] / base['GFLOP/image']:.2f}x" for r in rows[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
