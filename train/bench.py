"""Training benchmark: images/s, ms per step, peak memory and achieved TFLOP/s of the real training step.

    python -m train.bench --preset flowar-s --batch 8
    python -m train.bench --preset flowar-s --batch 8 --precision fp32,bf16    # side by side, one run
    python -m train.bench --preset flowar-s --batch 8 --compile off,on         # torch.compile side by side

A step is what ``train.train`` does per optimiser step on one process: forward (the flow loss over every
scale), backward, gradient clipping, AdamW with FlowAR's parameter groups, and the EMA update. Latents
and labels are random (the architecture, not the data, sets the cost) and the data pipeline is left out:
with a latent cache it is an index into memory. Each precision runs in its own process, so the peak
memory of one row (CUDA: max allocated; CPU: peak RSS) is not inflated by the rows before it.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval.bench_sample import PRECISIONS, comma_list, format_table, peak_memory_mib, run_isolated
from eval.machine import device_label
from flowar import PRESETS, FlowAR, get_preset

from .train import param_groups, update_ema


def measure(preset: str, batch: int, precision: str, device_name: str, warmup: int, steps: int,
            compiled: bool = False) -> dict:
    """Time ``steps`` training steps of ``preset`` at ``batch`` after ``warmup`` untimed ones. Compiled (the
    model's forward through ``torch.compile``, as ``TrainConfig.compile`` does): FLOPs are counted on an eager
    step first, then one untimed step compiles; its time is reported as the compile cost."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = FlowAR(get_preset(preset)).to(device).train()
    config = model.config
    optimizer = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4, betas=(0.9, 0.95))
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    side = config.scales[-1]
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, config.token_dim, side, side, generator=generator, device=device)
    labels = None if config.unconditional else torch.arange(batch, device=device) % config.num_classes
    autocast = (torch.autocast(device.type, dtype=PRECISIONS[precision]) if PRECISIONS[precision]
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = model(latents, labels, generator=generator).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    compile_note = "off"
    if compiled:
        model.compile()
        start = time.perf_counter()
        step()
        compile_note = f"on ({time.perf_counter() - start:.0f} s first step)"
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {
        "precision": precision,
        "compile": compile_note,
        "images/s": batch / seconds,
        "ms/step": 1000 * seconds,
        "peak MiB": peak_memory_mib(device),
        "GFLOP/image": flops / batch / 1e9,
        "TFLOP/s": flops / seconds / 1e12,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flowar-s", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="images per step on this one process")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the model's forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on GPU)")
    args = p.parse_args(argv)
    precisions = comma_list(p, "--precision", args.precision, PRECISIONS)
    compiles = comma_list(p, "--compile", args.compile, {"off": False, "on": True})
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device")
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 3)
    if warmup < 0 or steps < 1:
        p.error(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")
    params = sum(p.numel() for p in FlowAR(get_preset(args.preset)).parameters()) / 1e6
    where = device_label(device)
    print(f"training {args.preset} ({params:.1f}M params), batch {args.batch}, device {device} [{where}], "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {warmup} warm-up + {steps} timed steps")
    rows = [run_isolated(measure, args.preset, args.batch, precision, str(device), warmup, steps, compiled == "on")
            for precision in precisions for compiled in compiles]
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return row["precision"] + (" compiled" if row["compile"] != "off" else "")

        print(f"speed-up vs {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
