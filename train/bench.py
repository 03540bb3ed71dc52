"""Training benchmark: images/s, ms per step, peak memory and achieved TFLOP/s of the real training step.

    python -m train.bench --preset flowar-s --batch 8
    python -m train.bench --preset flowar-s --batch 8 --precision fp32,bf16    # side by side, one run
    python -m train.bench --preset flowar-s --batch 8 --compile off,on         # torch.compile side by side
    python -m train.bench --preset flowar-s --batch 8 --checkpointing off,on   # gradient checkpointing
    python -m train.bench --preset flowar-s --batch 4 --precision fp32,bf16 \\
        --reference /path/to/FlowAR --timm-path /tmp/timm_pkg                  # against the authors' step

A step is what ``train.train`` does per optimiser step on one process: forward (the flow loss over every
scale), backward, gradient clipping, fused AdamW with FlowAR's parameter groups (``train.build_optimizer``),
and the foreach EMA update. Latents and labels are random (the architecture, not the data, sets the cost)
and the data pipeline is left out: with a latent cache it is an index into memory. Each row runs in its own
process, so the peak memory of one row (CUDA: max allocated; CPU: peak RSS) is not inflated by the rows
before it. "% peak" divides a row's TFLOP/s by the machine's own 2048-square matmul rate in its precision.

``--reference PATH`` (a checkout of the authors' code, imported as ``eval/parity_flowar.py`` does) adds
their step as released: fp32 (their engine turns autocast off for the forward), their forward, backward,
clipping at 3.0, AdamW (0.9, 0.95) over the same parameter groups in torch's default kernel, and their EMA
loop over the parameters at 0.9999. Each row's peak memory comes from its own process; the times come
from one more process that holds their model and ours on the same weights and steps each in turn, the
fastest step of each counting.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval.bench_sample import add_peak_share, comma_list, format_table, peak_memory_mib, run_isolated
from eval.machine import device_label, matmul_peak_tflops
from flowar import PRESETS, FlowAR, get_preset
from flowar.outputs import PRECISIONS, autocast_context

from .train import build_optimizer, param_groups, update_ema

EMA_DECAY = 0.9999  # the authors' rate; the cost of an update does not depend on it


def our_step(model: FlowAR, batch: int, precision: str, device: torch.device):
    """``step()`` doing one training step of ``model`` as ``train.train`` does, on fixed random latents."""
    config = model.config
    optimizer = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    side = config.scales[-1]
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, config.token_dim, side, side, generator=generator, device=device)
    labels = None if config.unconditional else torch.arange(batch, device=device) % config.num_classes

    def step():
        with autocast_context(device, PRECISIONS[precision]):
            loss = model(latents, labels, generator=generator).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, EMA_DECAY)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def their_step(model: torch.nn.Module, config, batch: int, device: torch.device):
    """``step()`` doing one training step of the authors' ``model`` as their engine does it (see above)."""
    from eval.parity_flowar import cuda_calls_as_noop

    optimizer = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4, betas=(0.9, 0.95))
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    side = config.scales[-1]
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, config.token_dim, side, side, generator=generator, device=device)
    labels = torch.arange(batch, device=device) % config.num_classes

    def step():
        with cuda_calls_as_noop():
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


def count_and_compile(step, model, compiled: bool) -> tuple[int, str]:
    """FLOPs of one eager ``step``; then, if ``compiled``, compile ``model`` in place and run one step, whose
    time is the compile cost."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    if not compiled:
        return counter.get_total_flops(), "off"
    model.compile()
    start = time.perf_counter()
    step()
    return counter.get_total_flops(), f"on ({time.perf_counter() - start:.0f} s first step)"


def row_of(name: str, precision: str, note: str, checkpointing: bool, batch: int, seconds: float, flops: int,
           peak_mib: float | None) -> dict:
    return {"step": name, "precision": precision, "compile": note, "checkpointing": "on" if checkpointing else "off",
            "images/s": batch / seconds, "ms/step": 1000 * seconds,
            "peak MiB": peak_mib if peak_mib is not None else "-",
            "GFLOP/image": flops / batch / 1e9, "TFLOP/s": flops / seconds / 1e12}


def measure(preset: str, batch: int, precision: str, device_name: str, warmup: int, steps: int,
            compiled: bool = False, checkpointing: bool = False, overrides: dict | None = None) -> dict:
    """Time ``steps`` training steps of ``preset`` (with config ``overrides``) at ``batch`` after ``warmup``
    untimed ones. Compiled (the model's forward through ``torch.compile``, as ``TrainConfig.compile`` does):
    FLOPs are counted on an eager step first, then one untimed step compiles; its time is reported as the
    compile cost."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = FlowAR(get_preset(preset, grad_checkpointing=checkpointing, **(overrides or {}))).to(device).train()
    step = our_step(model, batch, precision, device)
    flops, note = count_and_compile(step, model, compiled)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return row_of("ours", precision, note, checkpointing, batch, seconds, flops, peak_memory_mib(device))


def build_reference_pair(reference_path: str, timm_path: str | None, preset: str, small: bool, device):
    """The authors' model for ``preset`` (train mode) and our config matching it."""
    from eval import parity_flowar as parity

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
    return peak_memory_mib(device)


def time_against_reference(reference_path: str, timm_path: str | None, preset: str, batch: int,
                           variants: list[tuple[str, bool, bool]], device_name: str, warmup: int, steps: int,
                           small: bool = False) -> list[dict]:
    """Their step and our ``variants`` ((precision, compiled, checkpointing) each), on the same initial weights,
    stepped in turn ``warmup + steps`` times; the fastest timed step of each counts. First row theirs."""
    from eval import parity_flowar as parity

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flowar-s", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="images per step on this one process")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the model's forward")
    p.add_argument("--checkpointing", default="off", help="comma list of off, on: gradient checkpointing of "
                   "the transformer blocks (FlowARConfig.grad_checkpointing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on GPU)")
    p.add_argument("--reference", default=None, help="checkout of the authors' FlowAR code: add their training "
                   "step, timed in one process with ours on the same weights (FlowAR-S/L/H presets)")
    p.add_argument("--timm-path", default=None, help="with --reference: folder holding timm, if not installed")
    p.add_argument("--small", action="store_true", help="with --reference: both sides in parity_flowar.py's "
                   "reduced layout, to check the harness in seconds (not a benchmark)")
    args = p.parse_args(argv)
    precisions = comma_list(p, "--precision", args.precision, PRECISIONS)
    compiles = comma_list(p, "--compile", args.compile, {"off": False, "on": True})
    checkpointings = comma_list(p, "--checkpointing", args.checkpointing, {"off": False, "on": True})
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.reference is not None:
        from eval.parity_flowar import REFERENCE_MODELS

        if args.preset not in REFERENCE_MODELS:
            p.error(f"--reference takes a --preset of {sorted(REFERENCE_MODELS)}, got {args.preset!r}")
    elif args.timm_path is not None or args.small:
        p.error("--timm-path and --small are used only with --reference")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device")
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 3)
    if warmup < 0 or steps < 1:
        p.error(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")
    params = sum(p.numel() for p in FlowAR(get_preset(args.preset)).parameters()) / 1e6
    where = device_label(device)
    peaks = {name: matmul_peak_tflops(dtype or torch.float32, device) for name, dtype in PRECISIONS.items()}
    print(f"training {args.preset} ({params:.1f}M params), batch {args.batch}, device {device} [{where}], "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {warmup} warm-up + {steps} timed steps")
    print("measured matmul peak (2048-square): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()))
    variants = [(precision, compiles_ == "on", checkpointing == "on") for precision in precisions
                for compiles_ in compiles for checkpointing in checkpointings]
    if args.reference is not None:
        rows = run_isolated(time_against_reference, args.reference, args.timm_path, args.preset, args.batch,
                            variants, str(device), warmup, steps, args.small)
        memory = [run_isolated(measure_reference_memory, args.reference, args.timm_path, args.preset, args.batch,
                               str(device), warmup + 1, args.small)]
        if args.small:  # our rows' memory in the small layout is not what measure() builds; leave it out
            memory += ["-"] * len(variants)
        else:
            # the reference's settings: no dropout, no label drop (eval.parity_flowar.reference_config)
            same = dict(attn_dropout=0.0, proj_dropout=0.0, label_drop=0.0)
            memory += [run_isolated(measure, args.preset, args.batch, precision, str(device), warmup, 1, compiled,
                                    checkpointing, same)["peak MiB"] for precision, compiled, checkpointing in variants]
        for row, peak in zip(rows, memory):
            row["peak MiB"] = peak
    else:
        rows = [run_isolated(measure, args.preset, args.batch, precision, str(device), warmup, steps, compiled,
                             checkpointing) for precision, compiled, checkpointing in variants]
    add_peak_share(rows, peaks)
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return (("authors " if row["step"] == "authors" else "") + row["precision"]
                    + (" compiled" if row["compile"] != "off" else "")
                    + (" checkpointing" if row["checkpointing"] == "on" else ""))

        print(f"speed-up vs {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
        if all(isinstance(r["peak MiB"], float) for r in rows):
            print(f"peak memory vs {name(base)}: " +
                  ", ".join(f"{name(r)} {r['peak MiB'] / base['peak MiB']:.2f}x" for r in rows[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
