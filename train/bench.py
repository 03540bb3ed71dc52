"""Training benchmark: FLOPs, ms per step, images/s, peak memory and achieved TFLOP/s of the real training step,
for a preset of any family (FlowAR, VAR, FlexVAR, xAR) or for the digits demo's own models side by side.

    python -m train.bench --preset flowar-s --batch 8
    python -m train.bench --preset flowar-s --batch 8 --precision fp32,bf16    # side by side, one run
    python -m train.bench --preset flowar-s --batch 8 --compile off,on         # torch.compile side by side
    python -m train.bench --preset flowar-s --batch 8 --checkpointing off,on   # gradient checkpointing (FlowAR)
    python -m train.bench --preset var-d16 --batch 8                           # VAR, FlexVAR or xAR presets too
    python -m train.bench --demo flowar,var,xar,flowar-flexible --precision bf16   # train.demo's models, batch 64

A step is what ``train.train`` does per optimiser step on one process, through its own functions: the model's
draws for the step (``draw_randomness``, on the CPU, then moved), the family's loss and its backward
(``forward_backward``), then clipping, fused AdamW over FlowAR's parameter groups (``build_optimizer``) and the
foreach EMA update (``apply_gradients``). The data are random, of the shapes and types a latent cache hands the
family (``train.latents``): FlowAR's and xAR's VAE latents, FlexVAR's tokenizer features, VAR's token maps of
codebook ids; the architecture, not the data, sets the cost. VAR and FlexVAR build their inputs from the ids
with a tokenizer of the model's codebook (random weights; only its quantiser, all a step runs of it). The data
pipeline is left out: with a latent cache it is an index into memory.

FLOPs are counted on one eager step with ``torch.utils.flop_counter.FlopCounterMode``: the matrix products,
convolutions and attention of the forward and the backward (the tokenizer's share included), not elementwise
work, the optimiser or the EMA (O(parameters) per step). The count depends on neither the machine nor the
precision, and it is proportional to the batch (every counted operation is per image). A model that draws
its list of scales every step (``scale_lists="random"``: FlexVAR, the flexible FlowAR) costs what the list
costs, so its count is the mean over ``LIST_DRAWS`` lists of its own law, each distinct list counted once on
one image of the step and scaled by the batch; its ms/step is over the timed steps' own draws.

``--demo``: the models of ``train.demo``, built from its config dicts with its recipe (``TRAINING``), at its
batch unless ``--batch`` is given; each row adds the demo's step count and its training compute, steps x the
demo's batch x FLOPs per image: the column that compares the demos at equal compute.

Each row runs in its own process, one after another, so the peak memory of one row (CUDA: max allocated; CPU:
peak RSS) is not inflated by the rows before it. "% peak" divides a row's TFLOP/s by the machine's own
2048-square matmul rate in its precision.

Timing the authors' training step beside ours is a maintainer tool of the repository, not part of the
package: ``python -m tools.bench_reference train --reference PATH [these options]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval.bench_sample import (FAMILIES, add_peak_share, comma_list, format_table, matching_tokenizer,
                               peak_memory_mib, preset_family, run_isolated)
from eval.machine import device_label, matmul_peak_tflops
from flowar.outputs import PRECISIONS, autocast_context
from vae.flexvq import FlexVQVAE
from vae.msvq import MultiScaleVQConfig, MultiScaleVQVAE

from .config import TrainConfig, load_config
from .demo import MODELS, TRAINING, generator_family, generator_steps
from .tokenizer_config import TokenizerConfig
from .train import apply_gradients, build_model, build_optimizer, check_data_matches, forward_backward, rows_of

# A preset row's optimiser settings besides TrainConfig's defaults. The cost of a step depends on neither: the
# EMA at the authors' rate, and AdamW steps of a size that shows in the weights.
PRESET_RECIPE = {"lr": 1e-4, "ema": 0.9999}
EMA_DECAY = PRESET_RECIPE["ema"]
# A random-list model's FLOPs: the mean over this many draws of its list law. The demo's flexible FlowAR draws
# 56 distinct lists in them (each counted once), and its mean token count is within 0.6% of 16,384 draws'.
LIST_DRAWS = 4096
# The demo models --demo benches: every one train.demo trains from scratch. flowar-fewstep trains the flowar
# row's model, then distils its head (train.distill_head), which is not a train.train step.
DEMOS = tuple(name for name in MODELS if name != "flowar-fewstep")
ALL_PRESETS = sorted(name for presets, _, _ in FAMILIES.values() for name in presets)


# ---------------------------------------------------------------------------------------------- the rows' models
def preset_training(preset: str, overrides: dict | None = None, checkpointing: bool = False):
    """(TrainConfig, tokenizer config or None) of a preset row: ``preset`` with config ``overrides``, its blocks
    checkpointed when ``checkpointing``; VAR and FlexVAR take the tokenizer preset of their codebook."""
    model = {**(overrides or {}), **({"grad_checkpointing": True} if checkpointing else {})}
    tokenizer = matching_tokenizer(preset) if preset_family(preset) in ("var", "flexvar") else None
    return TrainConfig(preset=preset, model=model, **PRESET_RECIPE), tokenizer


def demo_training(name: str, checkpointing: bool = False):
    """(TrainConfig, tokenizer config or None, steps) with which ``train.demo --model name`` trains its
    generator: the preset and step count its ``main`` picks, its model dict, its recipe (``TRAINING``), and for
    VAR the tokenizer it trains (``train.train_tokenizer``'s default), whose scales, codebook and code size the
    transformer takes."""
    model = dict(MODELS[name])
    tokenizer = None
    if name == "var":
        tokenizer = TokenizerConfig().msvq_config()
        model = {**model, "scales": list(tokenizer.scales), "vocab_size": tokenizer.codebook_size,
                 "code_dim": tokenizer.code_dim}
    if checkpointing:
        model["grad_checkpointing"] = True
    cfg = load_config(None, [f"preset={generator_family(name)[1]}-tiny", *TRAINING, *(f"model.{k}={json.dumps(v)}" for k, v in model.items())])
    return cfg, tokenizer, generator_steps(name)


def build_tokenizer(config):
    """A tokenizer of ``config`` (VAR's multi-scale VQ or FlexVAR's) with random weights, its encoder and decoder
    dropped: a step quantises cached data and decodes nothing. None for None."""
    if config is None:
        return None
    tokenizer = (MultiScaleVQVAE if isinstance(config, MultiScaleVQConfig) else FlexVQVAE)(config).eval()
    tokenizer.encoder = tokenizer.decoder = None
    return tokenizer


def random_batch(model, batch: int, generator: torch.Generator, tokenizer=None):
    """CPU data for ``batch`` images of the shapes and types a latent cache hands ``model``'s family: VAR's K token
    maps (B, s, s) of codebook ids; FlexVAR's tokenizer features (B, code_dim, S, S); FlowAR's and xAR's latents
    (B, token_dim, S, S). Checked by ``train.train.check_data_matches`` as a real source would be."""
    c = model.config
    if model.training_data == "tokens":
        data = [torch.randint(c.vocab_size, (batch, s, s), generator=generator) for s in c.scales]
        shape = (sum(s * s for s in c.scales),)
    else:
        side = getattr(c, "latent_side", c.scales[-1])  # FlowAR's latent is its last scale
        shape = (getattr(c, "code_dim", None) or c.token_dim, side, side)
        data = torch.randn((batch, *shape), generator=generator)
    check_data_matches(model, SimpleNamespace(kind=model.training_data, latent_shape=shape, autoencoder=tokenizer))
    return data


# ---------------------------------------------------------------------------------------------- the step
def our_step(model, batch: int, precision: str, device: torch.device, *, cfg: TrainConfig | None = None,
             tokenizer=None):
    """``step(scales=None, images=batch)`` doing one training step of ``model`` as ``train.train`` does, on a fixed
    random batch with the step's own draws. ``cfg``: the optimiser, clipping and EMA settings (default a preset
    row's); ``tokenizer``: VAR's and FlexVAR's. ``scales`` fixes a random-list model's sides for the step;
    ``images`` < ``batch`` steps on the batch's first images only (a FLOP count per list). Returns the step's
    loss (a detached tensor: reading it would wait for the device)."""
    cfg = cfg or TrainConfig(**PRESET_RECIPE)
    optimizer = build_optimizer(model, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)  # train.train draws on the CPU
    data = random_batch(model, batch, generator, tokenizer)
    data = [t.to(device) for t in data] if isinstance(data, list) else data.to(device)
    labels = None if model.config.unconditional else (torch.arange(batch) % model.config.num_classes).to(device)
    inputs = model.training_inputs(tokenizer.to(device) if tokenizer is not None else None)
    autocast = autocast_context(device, PRECISIONS[precision])

    def step(scales=None, images: int = batch):
        draws = model.draw_randomness(images, generator=generator, device="cpu",
                                      **({} if scales is None else {"scales": scales}))
        rows = slice(0, images)
        part = [t[rows] for t in data] if isinstance(data, list) else data[rows]
        out = forward_backward(model, part, None if labels is None else labels[rows], rows_of(draws, rows, device),
                               inputs, autocast=autocast)
        apply_gradients(model, optimizer, ema, grad_clip=cfg.grad_clip, decay=cfg.ema)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out.loss.detach()

    return step


def count_flops(step, *args) -> int:
    """FLOPs of one call ``step(*args)``."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(*args)
    return counter.get_total_flops()


def compile_in_place(step, model) -> str:
    """Compile ``model`` in place (its forward, as ``TrainConfig.compile`` does) and run one ``step``; the
    compile note of a row, with that step's time as the compile cost."""
    model.compile()
    start = time.perf_counter()
    step()
    return f"on ({time.perf_counter() - start:.0f} s first step)"


def count_and_compile(step, model, compiled: bool) -> tuple[int, str]:
    """FLOPs of one eager ``step``; then, if ``compiled``, :func:`compile_in_place`."""
    flops = count_flops(step)
    return flops, compile_in_place(step, model) if compiled else "off"


def step_flops(step, model, batch: int) -> tuple[float, int]:
    """(FLOPs of one step of ``model`` at ``batch``, lists counted). A model of fixed scales: one eager step. A
    random-list model: the mean over ``LIST_DRAWS`` lists of its own law, each distinct list counted once on a
    step of one image, times ``batch`` (the count is per image)."""
    if getattr(model.config, "scale_lists", "fixed") != "random":
        return count_flops(step), 1
    generator = torch.Generator().manual_seed(0)
    lists = collections.Counter(model.draw_scale_list(generator) for _ in range(LIST_DRAWS))
    total = sum(n * count_flops(step, sides, 1) for sides, n in lists.items())
    return batch * total / LIST_DRAWS, len(lists)


def row_of(name: str, precision: str, note: str, checkpointing: bool, batch: int, seconds: float, flops: float,
           peak_mib: float | None) -> dict:
    return {"step": name, "precision": precision, "compile": note, "checkpointing": "on" if checkpointing else "off",
            "images/s": batch / seconds, "ms/step": 1000 * seconds,
            "peak MiB": peak_mib if peak_mib is not None else "-",
            "GFLOP/step": flops / 1e9, "GFLOP/image": flops / batch / 1e9, "TFLOP/s": flops / seconds / 1e12}


@dataclasses.dataclass
class Measured:
    """One row's measurement, and what the table says about its model."""
    row: dict
    params: int
    lists: int  # scale lists its FLOPs average over (1: fixed scales)


def measure_training(cfg: TrainConfig, tokenizer_config, batch: int, precision: str, device_name: str, warmup: int,
                     steps: int, compiled: bool = False) -> Measured:
    """Time ``steps`` training steps of ``cfg``'s model (``train.train.build_model``) at ``batch`` after ``warmup``
    untimed ones. Compiled (the model's forward through ``torch.compile``, as ``TrainConfig.compile`` does): FLOPs
    are counted on eager steps first, then one untimed step compiles; its time is reported as the compile cost."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    step = our_step(model, batch, precision, device, cfg=cfg, tokenizer=build_tokenizer(tokenizer_config))
    flops, lists = step_flops(step, model, batch)
    note = compile_in_place(step, model) if compiled else "off"
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    checkpointing = bool(getattr(model.config, "grad_checkpointing", False))
    row = row_of("ours", precision, note, checkpointing, batch, seconds, flops, peak_memory_mib(device))
    return Measured(row, sum(p.numel() for p in model.parameters()), lists)


def measure(preset: str, batch: int, precision: str, device_name: str, warmup: int, steps: int,
            compiled: bool = False, checkpointing: bool = False, overrides: dict | None = None) -> dict:
    """The row of ``preset`` (with config ``overrides``): :func:`measure_training` of :func:`preset_training`."""
    cfg, tokenizer = preset_training(preset, overrides, checkpointing)
    return measure_training(cfg, tokenizer, batch, precision, device_name, warmup, steps, compiled).row


def measure_demo(name: str, batch: int, precision: str, device_name: str, warmup: int, steps: int,
                 compiled: bool = False, checkpointing: bool = False) -> Measured:
    """The row of the demo model ``name``: its step at ``batch``, its step count, and its training compute at
    the demo's own batch."""
    cfg, tokenizer, demo_steps = demo_training(name, checkpointing)
    measured = measure_training(cfg, tokenizer, batch, precision, device_name, warmup, steps, compiled)
    row = {k: v for k, v in measured.row.items() if k != "step"}
    measured.row = {"model": name, "params (M)": measured.params / 1e6, **row, "demo steps": demo_steps,
                    "demo TFLOP": demo_steps * cfg.global_batch * row["GFLOP/image"] / 1e3}
    return measured


# ---------------------------------------------------------------------------------------------- command line
@dataclasses.dataclass
class Settings:
    """A parsed, checked command line."""
    preset: str
    demos: list[str]  # the demo models of the rows (--demo), or none: the preset's rows
    batch: int
    variants: list[tuple[str, bool, bool]]  # (precision, compiled, checkpointing) of each row
    device: torch.device
    warmup: int
    steps: int


def build_parser(description: str = __doc__, prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options, on a parser that a caller may extend with its own."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a preset of any family (default flowar-s): "
                   + ", ".join(ALL_PRESETS))
    p.add_argument("--demo", default=None, help="instead of --preset, a comma list of train.demo's models, "
                   "one row each: " + ", ".join(DEMOS))
    p.add_argument("--batch", type=int, default=None, help="images per step on this one process (default 8; with "
                   "--demo, the demo's batch)")
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--compile", default="off", help="comma list of off, on: torch.compile the model's forward")
    p.add_argument("--checkpointing", default="off", help="comma list of off, on: gradient checkpointing of "
                   "the transformer blocks (FlowARConfig.grad_checkpointing; FlowAR's models only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on GPU)")
    return p


def check_checkpointing(p: argparse.ArgumentParser, preset: str, what: str) -> None:
    """Exit naming --checkpointing unless the family of ``preset`` (the model ``what``) checkpoints its blocks."""
    config_class = FAMILIES[preset_family(preset)][1].config_class
    if not any(f.name == "grad_checkpointing" for f in dataclasses.fields(config_class)):
        p.error(f"--checkpointing on: {what} has no gradient checkpointing (only FlowAR's models have it, "
                "FlowARConfig.grad_checkpointing)")


def settings_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """Split and check ``args`` (errors name the argument through ``p``)."""
    if args.demo is not None and args.preset is not None:
        p.error("--preset and --demo name the rows two ways: give one of them")
    preset = args.preset if args.preset is not None else "flowar-s"
    if preset not in ALL_PRESETS:
        p.error(f"--preset must be one of {ALL_PRESETS}, got {preset!r}")
    demos = comma_list(p, "--demo", args.demo, {*DEMOS, "flowar-fewstep"}) if args.demo is not None else []
    if "flowar-fewstep" in demos:
        p.error("--demo flowar-fewstep trains the flowar row's model, then distils its head (train.distill_head), "
                f"which is no train.train step: --demo takes {', '.join(DEMOS)}")
    precisions = comma_list(p, "--precision", args.precision, PRECISIONS)
    compiles = comma_list(p, "--compile", args.compile, {"off": False, "on": True})
    checkpointings = comma_list(p, "--checkpointing", args.checkpointing, {"off": False, "on": True})
    if "on" in checkpointings:
        for name in demos:
            check_checkpointing(p, demo_training(name)[0].preset, f"the demo's {name}")
        if not demos:
            check_checkpointing(p, preset, preset)
    batch = args.batch if args.batch is not None else (load_config(None, TRAINING).global_batch if demos else 8)
    if batch < 1:
        p.error(f"--batch must be >= 1, got {batch}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device")
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 3)
    if warmup < 0 or steps < 1:
        p.error(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")
    variants = [(precision, compiled == "on", checkpointing == "on") for precision in precisions
                for compiled in compiles for checkpointing in checkpointings]
    return Settings(preset, demos, batch, variants, device, warmup, steps)


def print_header(s: Settings) -> dict[str, float]:
    """Print what the run measures and on what, and return the machine's matmul rate per precision."""
    where = device_label(s.device)
    peaks = {name: matmul_peak_tflops(dtype or torch.float32, s.device) for name, dtype in PRECISIONS.items()}
    if s.demos:
        what = f"train.demo's {', '.join(s.demos)}"
    else:
        what = f"{s.preset} ({sum(p.numel() for p in build_model(preset_training(s.preset)[0]).parameters()) / 1e6:.1f}M params)"
    print(f"training {what}, batch {s.batch}, device {s.device} [{where}], torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {s.warmup} warm-up + {s.steps} timed steps")
    print("measured matmul peak (2048-square): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()))
    return peaks


def significant(value: float, digits: int = 3) -> str:
    """``value`` to at least ``digits`` significant digits, never in exponent form (a FLOP count spans 1 to 10^6)."""
    whole = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    return f"{value:.{max(digits - whole, 0)}f}"


FLOP_COLUMNS = ("GFLOP/step", "GFLOP/image", "demo TFLOP")


def print_rows(rows: list[dict], peaks: dict[str, float]) -> None:
    """The table, then each row's speed (and peak memory, where every row has it) against the first row."""
    add_peak_share(rows, peaks)
    for row in rows:  # a demo row's step count and compute last, beside each other
        for key in ("demo steps", "demo TFLOP"):
            if key in row:
                row[key] = row.pop(key)
    print(format_table([{k: significant(v) if k in FLOP_COLUMNS else v for k, v in row.items()} for row in rows]))
    if len(rows) > 1:
        base = rows[0]

        def name(row):
            return ((row["model"] + " " if "model" in row else "" if row["step"] == "ours" else row["step"] + " ")
                    + row["precision"] + (" compiled" if row["compile"] != "off" else "")
                    + (" checkpointing" if row["checkpointing"] == "on" else ""))

        print(f"speed-up vs {name(base)}: " +
              ", ".join(f"{name(r)} {r['images/s'] / base['images/s']:.2f}x" for r in rows[1:]))
        if all(isinstance(r["peak MiB"], float) for r in rows):
            print(f"peak memory vs {name(base)}: " +
                  ", ".join(f"{name(r)} {r['peak MiB'] / base['peak MiB']:.2f}x" for r in rows[1:]))


def list_notes(names: list[str], measured: list[Measured]) -> list[str]:
    """A line for each model whose FLOPs average over lists of scales."""
    seen = {}
    for name, m in zip(names, measured):
        if m.lists > 1:
            seen.setdefault(name, m.lists)
    return [f"{name} draws its list of scales every step: GFLOP/step is the mean over {LIST_DRAWS} draws of its "
            f"list law ({lists} distinct lists), ms/step the mean over the timed steps' own lists"
            for name, lists in seen.items()]


def main(argv=None) -> int:
    p = build_parser()
    s = settings_from_args(p, p.parse_args(argv))
    peaks = print_header(s)
    if s.demos:
        names = [name for name in s.demos for _ in s.variants]
        measured = [run_isolated(measure_demo, name, s.batch, precision, str(s.device), s.warmup, s.steps, compiled,
                                 checkpointing) for name in s.demos for precision, compiled, checkpointing in s.variants]
    else:
        names = [s.preset] * len(s.variants)
        measured = [run_isolated(measure_training, *preset_training(s.preset, None, checkpointing), s.batch, precision,
                                 str(s.device), s.warmup, s.steps, compiled)
                    for precision, compiled, checkpointing in s.variants]
    print_rows([m.row for m in measured], peaks)
    for line in list_notes(names, measured):
        print(line)
    if s.demos:
        print(f"demo TFLOP: the demo's steps x its batch of {load_config(None, TRAINING).global_batch} x "
              "GFLOP/image; the FLOP columns count matrix products, convolutions and attention, forward and backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
