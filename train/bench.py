"""Training benchmark: images/s, ms per step, peak memory and achieved TFLOP/s of the real training step.

    python -m train.bench --preset flowar-s --batch 8
    python -m train.bench --preset flowar-s --batch 8 --precision fp32,bf16    # side by side, one run
    python -m train.bench --preset flowar-s --batch 8 --compile off,on         # torch.compile side by side
    python -m train.bench --preset flowar-s --batch 8 --checkpointing off,on   # gradient checkpointing

A step is what ``train.train`` does per optimiser step on one process: forward (the flow loss over every
scale), backward, gradient clipping, fused AdamW with FlowAR's parameter groups (``train.build_optimizer``),
and the foreach EMA update. Latents and labels are random (the architecture, not the data, sets the cost)
and the data pipeline is left out: with a latent cache it is an index into memory. Each row runs in its own
process, so the peak memory of one row (CUDA: max allocated; CPU: peak RSS) is not inflated by the rows
before it. "% peak" divides a row's TFLOP/s by the machine's own 2048-square matmul rate in its precision.

Timing the authors' training step beside ours is a maintainer tool of the repository, not part of the
package: ``python -m tools.bench_reference train --reference PATH [these options]``.
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

from .train import build_optimizer, update_ema

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


@dataclasses.dataclass
class Settings:
    """A parsed, checked command line."""
    preset: str
    batch: int
    variants: list[tuple[str, bool, bool]]  # (precision, compiled, checkpointing) of each row
    device: torch.device
    warmup: int
    steps: int


def build_parser(description: str = __doc__, prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options, on a parser that a caller may extend with its own."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flowar-s", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="images per step on this one process")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the model's forward")
    p.add_argument("--checkpointing", default="off", help="comma list of off, on: gradient checkpointing of "
                   "the transformer blocks (FlowARConfig.grad_checkpointing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on GPU)")
    return p


def settings_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """Split and check ``args`` (errors name the argument through ``p``)."""
    precisions = comma_list(p, "--precision", args.precision, PRECISIONS)
    compiles = comma_list(p, "--compile", args.compile, {"off": False, "on": True})
    checkpointings = comma_list(p, "--checkpointing", args.checkpointing, {"off": False, "on": True})
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device")
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 3)
    if warmup < 0 or steps < 1:
        p.error(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")
    variants = [(precision, compiled == "on", checkpointing == "on") for precision in precisions
                for compiled in compiles for checkpointing in checkpointings]
    return Settings(args.preset, args.batch, variants, device, warmup, steps)


def print_header(s: Settings) -> dict[str, float]:
    """Print what the run measures and on what, and return the machine's matmul rate per precision."""
    params = sum(p.numel() for p in FlowAR(get_preset(s.preset)).parameters()) / 1e6
    where = device_label(s.device)
    peaks = {name: matmul_peak_tflops(dtype or torch.float32, s.device) for name, dtype in PRECISIONS.items()}
    print(f"training {s.preset} ({params:.1f}M params), batch {s.batch}, device {s.device} [{where}], "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {s.warmup} warm-up + {s.steps} timed steps")
    print("measured matmul peak (2048-square): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()))
    return peaks


def print_rows(rows: list[dict], peaks: dict[str, float]) -> None:
    """The table, then each row's speed (and peak memory, where every row has it) against the first row."""
    add_peak_share(rows, peaks)
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return (("" if row["step"] == "ours" else row["step"] + " ") + row["precision"]
                    + (" compiled" if row["compile"] != "off" else "")
                    + (" checkpointing" if row["checkpointing"] == "on" else ""))

        print(f"speed-up vs {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
        if all(isinstance(r["peak MiB"], float) for r in rows):
            print(f"peak memory vs {name(base)}: " +
                  ", ".join(f"{name(r)} {r['peak MiB'] / base['peak MiB']:.2f}x" for r in rows[1:]))


def main(argv=None) -> int:
    p = build_parser()
    s = settings_from_args(p, p.parse_args(argv))
    peaks = print_header(s)
    rows = [run_isolated(measure, s.preset, s.batch, precision, str(s.device), s.warmup, s.steps, compiled,
                         checkpointing) for precision, compiled, checkpointing in s.variants]
    print_rows(rows, peaks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
