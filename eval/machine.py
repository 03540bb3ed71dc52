"""What a measurement ran on, in the words a reader needs to compare it: the CPU's name and the matrix flags
that decide its speed (float results and timings change with them and with the thread count)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence

import torch

# The flags that change matmul speed the most on x86 (AMX bf16 gave one machine ~7x the fp32 matmul rate).
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of MATMUL_FLAGS the CPU has (empty where /proc/cpuinfo cannot be read)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in MATMUL_FLAGS if flag in present]
    return []


def device_label(device: torch.device) -> str:
    """The accelerator's name, or the CPU's with its matmul flags: what a benchmark's header names."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}; {' '.join(cpu_flags()) or 'no AVX/AMX flags read'}"


def describe_cpu() -> dict:
    """The machine fields of a results file: CPU name, matmul flags, cores and torch threads."""
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, *, size: int = 2048, seconds: float = 1.0) -> float:
    """The machine's achieved TFLOP/s on a square ``size`` matmul in ``dtype``: the fastest of repeated calls
    over about ``seconds`` after two warm-up calls. A benchmark divides its own rate by this to say how much
    of what the hardware does on its best-shaped work its model reaches."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    best = float("inf")
    spent = 0.0
    for call in range(1000):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if call >= 2:  # the first calls pick kernels and fault pages in
            best = min(best, elapsed)
            spent += elapsed
            if spent >= seconds and call >= 5:
                break
    return 2 * size**3 / best / 1e12


def fastest_in_turn(calls: Sequence[Callable[[int], object]], rounds: int) -> list[float]:
    """Seconds of each call's fastest run over ``rounds`` rounds in which the calls take turns, each called with
    the round's index: a drift of the machine's speed reaches every call alike, and the fastest run is the one
    least disturbed by it."""
    best = [float("inf")] * len(calls)
    for round_ in range(rounds):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call(round_)
            best[i] = min(best[i], time.perf_counter() - start)
    return best
