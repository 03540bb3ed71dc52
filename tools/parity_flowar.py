"""Parity check against the authors' FlowAR code: the same weights and the same noise give the same numbers.

    python -m tools.parity_flowar --reference /path/to/FlowAR --preset flowar-s
    python -m tools.parity_flowar --reference /path/to/FlowAR --preset flowar-s --checkpoint FlowAR-S.pth
    python -m tools.parity_flowar --reference /path/to/FlowAR --preset flowar-l --small --timm-path /tmp/timm_pkg

``--reference`` is a checkout of the authors' code (the public fork wangqiang9/FlowAR: ``models/flowar.py``,
``flowloss.py``, ``sampler.py``, ``flowmodel.py``, ``rope.py``). Nothing of it is copied here; it is imported
from that folder. It needs ``timm``, ``scipy`` and ``einops`` importable; when timm is not installed, point
``--timm-path`` to a folder that holds it (e.g. ``pip install --target DIR --no-deps timm``).

What it does:

1. Builds the authors' model for the preset (the released eval settings of the head: S d=2 w=1024, L d=12
   w=1024, H d=12 w=1536) with dropout 0 and label drop 0, loads ``--checkpoint`` into it if given (else
   keeps their random init), and moves their ``state_dict()`` into ours through
   ``flowar.model.convert_released_state_dict`` and a strict load: the released-checkpoint import path,
   exercised on their real key layout.
2. Training loss, both in train mode (their attention is block-causal only in training mode), on the same
   random latents and labels: the random draws their forward makes (label drop, and per scale the time and
   the noise inside ``SILoss``) are recorded and handed to ours (``flow_times`` / ``flow_noise``). Also the
   per-token conditions z of the transformer and, per scale, the head's velocity on their exact inputs.
3. Sampling in eval mode: their ``sample_tokens`` draws the initial noise of each scale for the doubled
   batch; the conditional half goes to our ``sample_with_stats(noise=...)``. Head evaluations and head rows
   are counted on both sides.

Differences are reported as max |ours - theirs| and that divided by max |theirs| (the tensor's scale;
an element-wise ratio is meaningless near zeros). The exit code is 1 when one exceeds ``--tolerance``.

``--small`` builds both sides with the preset's layout (head variant, head dim, checkpointing) but two
encoder and two decoder blocks, four heads and a two-block head, so a CPU run takes seconds; the class
table stays at 1000 + 1 rows, since theirs is hard-coded to that.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from flowar import FlowAR, FlowARConfig, get_preset
from flowar.model import convert_released_state_dict
from vae.files import load_state_strict, read_torch_state_dict
from heads.solvers import step_schedule

# Their builder and the head size of their eval scripts for each preset we can compare.
REFERENCE_MODELS = {
    "flowar-s": ("flowar_small", 2, 1024),
    "flowar-l": ("flowar_large", 12, 1024),
    "flowar-h": ("flowar_huge", 12, 1536),
}
# --small: four attention heads of the preset's head dim (S/L 64, H 96), 2 + 2 blocks, a 2-block head of
# the preset's variant with 2 (S/L) or 3 (H) heads of 64.
SMALL = {
    "flowar-s": dict(width=256, num_heads=4, head_width=128),
    "flowar-l": dict(width=256, num_heads=4, head_width=128),
    "flowar-h": dict(width=384, num_heads=4, head_width=192),
}
SMALL_DEPTHS = dict(encoder_depth=2, decoder_depth=2, head_depth=2)
# The reference's modules; every random draw made inside them is recorded (and unexpected ones are errors).
REFERENCE_MODULES = ("flowar", "flowloss", "sampler", "flowmodel", "rope")

# Relative tolerance (to max |theirs|). float32 carries 24 bits (eps 1.2e-7); the two sides compute the
# same formulas in different orders (per-scale attention calls vs one masked call, RoPE tables built
# differently, fused vs separate adds), which costs some ulps per layer, about 1e-6 relative after the
# deep stacks here. 1e-4 leaves two orders of magnitude for that and still fails on any real formula
# difference (a wrong norm, scale, sign, time convention or index gives errors of 1e-2 and up).
DEFAULT_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------- environment
class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import torchvision[.*]`` with inert modules.

    timm imports torchvision at import time (feature extraction, FrozenBatchNorm2d, datasets, transforms),
    but the two timm pieces FlowAR uses (``SwiGLU``, ``DropPath``) never touch it. Any attribute of a stub
    module is a placeholder class (its class attributes are placeholders too, for enums such as
    ``InterpolationMode.BICUBIC``); building an instance raises, so a stub can never silently compute.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is stubbed by parity_flowar.py; {cls.__name__} cannot be used")


def _placeholder(name: str) -> type:
    return _Placeholder(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


@contextlib.contextmanager
def _torchvision_stub_if_absent():
    """Install the stub finder for the duration of the reference import, only if torchvision is absent."""
    if importlib.util.find_spec("torchvision") is not None:
        yield False
        return
    finder = _StubTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        yield True
    finally:
        sys.meta_path.remove(finder)  # modules already imported from it stay in sys.modules for timm


@contextlib.contextmanager
def cuda_calls_as_noop():
    """Make ``Tensor.cuda()`` return the tensor itself while CUDA is unavailable.

    Their forward, sampler and RoPE call ``.cuda()`` on freshly made tensors. Without a GPU those tensors
    are already where the model is (the CPU), so returning them unchanged is exactly what the call means
    here. With CUDA available nothing is patched and everything runs on the GPU.
    """
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def checkout_root(reference) -> Path:
    """The resolved folder ``reference``; a FileNotFoundError naming --reference unless it holds their model."""
    root = Path(reference).expanduser().resolve()
    if not (root / "models" / "flowar.py").is_file():
        raise FileNotFoundError(
            f"--reference must be a checkout of the authors' FlowAR code holding models/flowar.py; got {root}"
        )
    return root


def import_reference(reference, *, timm_path=None) -> dict[str, types.ModuleType]:
    """Import the authors' ``models`` package from the checkout ``reference``; returns its modules by name."""
    root = checkout_root(reference)
    if timm_path is not None:
        timm_root = Path(timm_path).expanduser().resolve()
        if not (timm_root / "timm").is_dir():
            raise FileNotFoundError(f"--timm-path must be a folder that holds the timm package; got {timm_root}")
        sys.path.insert(0, str(timm_root))
    loaded = sys.modules.get("models")
    if loaded is not None and not any(Path(p).resolve() == root / "models" for p in getattr(loaded, "__path__", [])):
        raise ImportError(f"another package named 'models' is already imported ({loaded}); run in a fresh process")
    # Their modules import each other as ``models.*`` (absolute), so the checkout root goes on the path.
    sys.path.insert(0, str(root))
    try:
        with _torchvision_stub_if_absent():
            flowar_module = importlib.import_module("models.flowar")
    except ModuleNotFoundError as err:
        hint = " (install it or pass --timm-path FOLDER)" if err.name and err.name.split(".")[0] == "timm" else ""
        raise ImportError(f"the reference code needs the module {err.name!r}{hint}") from err
    if Path(flowar_module.__file__).resolve() != root / "models" / "flowar.py":
        raise ImportError(f"models.flowar came from {flowar_module.__file__}, not from --reference {root}")
    return {name: sys.modules[f"models.{name}"] for name in REFERENCE_MODULES if f"models.{name}" in sys.modules}


# ---------------------------------------------------------------------------------------- the two models
def reference_config(preset: str, *, small: bool) -> FlowARConfig:
    """Our config matching the reference model the tool builds: no dropout, no label drop."""
    overrides = dict(attn_dropout=0.0, proj_dropout=0.0, label_drop=0.0)
    if small:
        overrides.update(SMALL[preset], **SMALL_DEPTHS)
    return get_preset(preset, **overrides)


def build_reference(flowar_module, preset: str, config: FlowARConfig, *, small: bool):
    """Their model for ``preset`` (or its --small version, described by ``config``)."""
    builder, head_depth, head_width = REFERENCE_MODELS[preset]
    common = dict(attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0)
    if not small:
        return getattr(flowar_module, builder)(diffloss_d=head_depth, diffloss_w=head_width, **common)
    c = config
    return flowar_module.FlowAR(
        encoder_embed_dim=c.width, encoder_depth=c.encoder_depth, encoder_num_heads=c.num_heads,
        decoder_embed_dim=c.width, decoder_depth=c.decoder_depth, decoder_num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, diffloss_d=c.head_depth, diffloss_w=c.head_width,
        cross=c.head == "transformer-v2", use_checkpoint=c.grad_checkpointing, **common,
    )


@dataclass
class WeightTransfer:
    """How their ``state_dict()`` went into ours."""

    copied: int
    dropped: list[str]  # their keys the converter drops on purpose
    missing: list[str]  # ours that they lack (must be empty)
    unexpected: list[str]  # theirs (after conversion) that we lack (must be empty)


def ours_from_reference(reference: torch.nn.Module, config: FlowARConfig) -> tuple[FlowAR, WeightTransfer]:
    """Our model with their weights, through the released-checkpoint converter and a strict load."""
    theirs = reference.state_dict()
    converted = convert_released_state_dict(theirs, config)
    ours = FlowAR(config)
    own = set(ours.state_dict())
    transfer = WeightTransfer(
        copied=len(converted),
        dropped=sorted(set(theirs) - set(converted)),
        missing=sorted(own - set(converted)),
        unexpected=sorted(set(converted) - own),
    )
    load_state_strict(ours, converted, source="the reference model's state_dict()")
    return ours, transfer


# ---------------------------------------------------------------------------------------- recording draws
class _RecordingTorch:
    """Stands in for the name ``torch`` inside the reference modules and records their random draws."""

    RECORDED = ("rand", "randn", "randn_like")

    def __init__(self, real):
        self._real = real
        self.draws: list[tuple[str, torch.Tensor]] = []

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self.RECORDED:
            return attr

        def record(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.draws.append((name, out.detach().clone()))
            return out

        return record


@contextlib.contextmanager
def record_draws(namespaces):
    """Within the block, ``torch.rand/randn/randn_like`` called from these modules are recorded.

    Only the modules' own global name ``torch`` is swapped (for a proxy that records and then returns
    exactly what the real call returned), so the draws come from the global RNG as usual and our code,
    which never looks at their namespaces, is untouched.
    """
    recorder = _RecordingTorch(torch)
    saved = [(ns, ns.torch) for ns in namespaces]
    for ns, _ in saved:
        ns.torch = recorder
    try:
        yield recorder.draws
    finally:
        for ns, original in saved:
            ns.torch = original


def _check_draws(draws, expected, what: str):
    got = [(name, tuple(t.shape)) for name, t in draws]
    if got != expected:
        raise RuntimeError(f"the reference {what} drew {got}; this tool expects {expected} (has their code changed?)")


@contextlib.contextmanager
def _wrap_method(obj, name: str, sink: list):
    """Replace ``obj.name`` by a wrapper that appends each return value to ``sink`` (instance attribute)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        sink.append(out.detach())
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


@contextlib.contextmanager
def _record_head_calls(head: torch.nn.Module, sink: list):
    """Append ((x_t, t, cond), v) of every call of ``head`` to ``sink``."""
    handle = head.register_forward_hook(
        lambda module, inputs, output: sink.append((tuple(i.detach() for i in inputs), output.detach()))
    )
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------- comparisons
@dataclass
class Row:
    """One compared quantity."""

    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max_abs / max |theirs|
    exact: bool = False  # token ids: max_abs counts differing ids, and any difference fails

    def ok(self, tolerance: float) -> bool:
        return self.max_abs == 0 if self.exact else self.max_rel <= tolerance  # False for NaN as well


def compare(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> Row:
    if ours.shape != theirs.shape:
        raise RuntimeError(f"{name}: ours has shape {tuple(ours.shape)}, theirs {tuple(theirs.shape)}")
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    max_abs = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Row(name, tuple(theirs.shape), max_abs, max_rel)


def compare_training(reference, ours: FlowAR, latents, labels, *, namespaces, seed: int = 0) -> list[Row]:
    """Total loss, z and per-scale head velocities, both models in train mode on the same draws."""
    config = ours.config
    batch, channels, scales = latents.shape[0], config.token_dim, config.scales
    reference.train()
    ours.train()
    ref_z, ref_head, our_z = [], [], []
    torch.manual_seed(seed)
    with torch.no_grad(), cuda_calls_as_noop(), record_draws(namespaces) as draws, \
            _wrap_method(reference, "forward_mae_decoder", ref_z), _record_head_calls(reference.flownet, ref_head):
        ref_loss = reference(latents, labels)
    expected = [("rand", (batch,))]
    for side in scales:
        expected += [("rand", (batch, 1, 1)), ("randn_like", (batch, side * side, channels))]
    _check_draws(draws, expected, "training forward")
    label_drop, scale_draws = draws[0][1], draws[1:]
    if (label_drop < reference.label_drop_prob).any():  # the tool builds theirs with label_drop_prob 0
        raise RuntimeError("the reference dropped labels although its label_drop_prob is 0")
    times = [scale_draws[2 * k][1].reshape(batch) for k in range(len(scales))]
    noise = [scale_draws[2 * k + 1][1] for k in range(len(scales))]

    with torch.no_grad(), _wrap_method(ours, "transformer", our_z):
        our_loss = ours(latents, labels, flow_times=times, flow_noise=noise).loss

    rows = [compare("training loss (total)", our_loss, ref_loss), compare("z, all scales", our_z[0], ref_z[0])]
    if len(ref_head) != len(scales):
        raise RuntimeError(f"the reference head ran {len(ref_head)} times in the training forward, "
                           f"expected {len(scales)} (one per scale)")
    with torch.no_grad():
        for side, ((x_t, t, cond), v_ref) in zip(scales, ref_head):
            rows.append(compare(f"head v, {side}x{side} (their x_t, t, z)", ours.flownet(x_t, t, cond), v_ref))
    return rows


@dataclass
class SamplingCounts:
    """Head evaluations and head rows (token rows through the head, summed over evaluations)."""

    ours_nfe: int
    ours_rows: int
    ref_nfe: int
    ref_rows: int
    ref_rows_formula: int  # steps * (2B with guidance, else B) * tokens, over all scales


def compare_sampling(reference, ours: FlowAR, labels, *, cfg: float, guidance: float, steps: int,
                     namespaces, seed: int = 0) -> tuple[list[Row], SamplingCounts]:
    """Their ``sample_tokens`` against our ``sample_with_stats`` on the same initial noise."""
    config = ours.config
    batch, scales = labels.shape[0], config.scales
    doubled = 2 * batch if cfg != 1.0 else batch
    reference.eval()
    ours.eval()
    ref_head = []
    torch.manual_seed(seed)
    with torch.no_grad(), cuda_calls_as_noop(), record_draws(namespaces) as draws, \
            _record_head_calls(reference.flownet, ref_head):
        ref_latents = reference.sample_tokens(num_steps=steps, guidance=guidance, cfg=cfg, labels=labels)
    _check_draws(draws, [("randn", (doubled, s * s, config.token_dim)) for s in scales], "sampler")
    noise = [n[:batch] for _, n in draws]  # the conditional rows; the null rows' noise has no counterpart
    # Their sampler switches to the uniform grid at 50 steps; ours takes the grid as an option.
    schedule = "uniform" if steps == 50 else "flowar"
    out = ours.sample_with_stats(labels, guidance_scale=cfg, guidance_interval=(0.0, guidance), steps=steps,
                                 schedule=schedule, noise=noise)
    intervals = len(step_schedule(steps, schedule)) - 1
    counts = SamplingCounts(
        ours_nfe=out.nfe, ours_rows=out.head_rows,
        ref_nfe=len(ref_head), ref_rows=sum(x.shape[0] * x.shape[1] for (x, _, _), _ in ref_head),
        ref_rows_formula=intervals * doubled * sum(s * s for s in scales),
    )
    return [compare(f"sampled latents (cfg {cfg:g}, {steps} steps)", out.latents, ref_latents)], counts


# ---------------------------------------------------------------------------------------- report
def format_table(rows: list[Row], tolerance: float) -> str:
    width = max([44, *(len(r.name) + 1 for r in rows)])
    header = f"{'quantity':<{width}} {'shape':<20} {'max |diff|':>11} {'max rel':>11}  result"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.exact:
            verdict = "ok (identical)" if r.ok(tolerance) else "FAIL (ids differ)"
            lines.append(f"{r.name:<{width}} {str(r.shape):<20} {int(r.max_abs):>11d} {'':>11}  {verdict}")
        else:
            verdict = "ok" if r.ok(tolerance) else f"FAIL (> {tolerance:g})"
            lines.append(f"{r.name:<{width}} {str(r.shape):<20} {r.max_abs:>11.3e} {r.max_rel:>11.3e}  {verdict}")
    return "\n".join(lines)


def format_counts(c: SamplingCounts, batch: int) -> str:
    return "\n".join([
        f"{'head work (batch ' + str(batch) + ')':<30} {'NFE':>6} {'head rows':>11}",
        f"{'theirs (counted)':<30} {c.ref_nfe:>6} {c.ref_rows:>11}",
        f"{'theirs (formula)':<30} {'':>6} {c.ref_rows_formula:>11}",
        f"{'ours':<30} {c.ours_nfe:>6} {c.ours_rows:>11}   ({c.ours_rows / max(c.ref_rows, 1):.1%} of theirs)",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True,
                        help="checkout of the authors' FlowAR code (holds models/flowar.py)")
    parser.add_argument("--preset", required=True, choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--checkpoint", default=None, help="released FlowAR-{S,L,H}.pth (default: their random init)")
    parser.add_argument("--timm-path", default=None, help="folder holding timm, if timm is not installed")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the preset's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="upper end of the guidance interval, their guidance_high (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="steps per scale (default: the preset's)")
    parser.add_argument("--small", action="store_true", help="reduced widths and depths on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted max |diff| / max |theirs| (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--skip-sampling", action="store_true", help="compare the training pass only")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.cfg is not None and args.cfg <= 1.0:
        # Their sample_tokens leaves z_sample unset when cfg == 1 (NameError) and guides only for cfg > 1.
        parser.error(f"--cfg must be > 1: the reference sampler works only with guidance; got {args.cfg}")
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        modules = import_reference(args.reference, timm_path=args.timm_path)
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # compare fp32 with fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    config = reference_config(args.preset, small=args.small)
    defaults = config.sampling
    cfg = defaults.guidance_scale if args.cfg is None else args.cfg  # FlowAR's cfg is our guidance scale
    guidance = defaults.guidance_interval[1] if args.guidance is None else args.guidance
    steps = defaults.steps if args.steps is None else args.steps
    torch.manual_seed(args.seed)
    reference = build_reference(modules["flowar"], args.preset, config, small=args.small)
    if args.checkpoint:
        reference.load_state_dict(read_torch_state_dict(args.checkpoint), strict=True)
    ours, transfer = ours_from_reference(reference, config)
    reference.to(device)
    ours.to(device)

    size = "small" if args.small else "full size"
    print(f"preset {args.preset} ({size}): width {config.width}, {config.encoder_depth}+{config.decoder_depth} blocks, "
          f"{config.num_heads} heads, head {config.head} w={config.head_width} d={config.head_depth}; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters; device {device}")
    print(f"weights: {args.checkpoint or 'their random init'}; {transfer.copied} tensors into ours; "
          f"dropped by the converter: {', '.join(transfer.dropped) or 'none'}; "
          f"missing: {', '.join(transfer.missing) or 'none'}; unexpected: {', '.join(transfer.unexpected) or 'none'}")

    namespaces = list(modules.values())
    generator = torch.Generator().manual_seed(args.seed)
    side = config.scales[-1]
    latents = torch.randn(args.batch, config.token_dim, side, side, generator=generator).to(device)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=generator).to(device)
    print(f"batch {args.batch}, labels {labels.tolist()}, cfg {cfg:g}, guidance interval [0, {guidance:g}], "
          f"{steps} steps, tolerance {args.tolerance:g} (relative to max |theirs|)\n")

    start = time.perf_counter()
    rows = compare_training(reference, ours, latents, labels, namespaces=namespaces, seed=args.seed)
    timings = [f"training pass {time.perf_counter() - start:.1f} s"]
    counts = None
    if not args.skip_sampling:
        start = time.perf_counter()
        sample_rows, counts = compare_sampling(reference, ours, labels, cfg=cfg, guidance=guidance, steps=steps,
                                               namespaces=namespaces, seed=args.seed + 1)
        rows += sample_rows
        timings.append(f"sampling (both) {time.perf_counter() - start:.1f} s")
    print(format_table(rows, args.tolerance))
    if counts is not None:
        print()
        print(format_counts(counts, args.batch))
    print("\n" + "; ".join(timings))
    failed = [r.name for r in rows if not r.ok(args.tolerance)]
    print("PARITY FAILED: " + ", ".join(failed) if failed else "parity: all within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
