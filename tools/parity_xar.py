"""Parity check of our xAR against the authors' code: the same weights and the same draws give the same numbers.

    python -m tools.parity_xar --reference /path/to/xAR --preset xar-b --timm-path /path/to/timm
    python -m tools.parity_xar --reference /path/to/xAR --preset xar-h --small --timm-path /path/to/timm
    python -m tools.parity_xar --reference /path/to/xAR --preset xar-b --checkpoint xAR-B.pth

``--reference`` is a checkout of OliverRensu/xAR (``models/xar.py``, ``models/sampler.py``, ``models/rope.py``,
``models/flow.py``). Nothing of it is copied here: those files are imported from that folder, with ``models``
registered as a bare package. They need ``timm`` (SwiGLU, DropPath), ``scipy`` and ``einops``; when timm is not
installed, ``--timm-path`` names a folder that holds it (a source checkout works; torchvision, which timm
imports, is answered by inert stand-ins when absent). Their ``xar.py`` imports ``flash_attn`` without using
it: when it is not installed, a stand-in module whose function refuses to run is registered. Their code calls
``.cuda()``; without a GPU, ``Tensor.cuda`` and ``Module.cuda`` return their object unchanged while their
code runs (and are restored afterwards).

What it does:

1. Builds their model for the preset (``xar_base`` / ``xar_large`` / ``xar_huge``; ``--small``: the preset's
   width and heads with 2 + 2 blocks) with dropout 0 and label drop 0.5, compares their init with ours (the
   std of every tensor), then replaces every weight of theirs by random values of full scale (their init,
   xavier-uniform everywhere with zero biases and unit norm gains, would let a wrong bias, norm gain or adaLN
   chunk pass unnoticed). ``--checkpoint`` loads a released file instead.
2. Their ``state_dict()`` goes through a ``.pth`` file into ``XAR.from_released`` (weights_only, the mask and
   the RoPE tables checked and dropped, strict keys).
3. Training pass, both in train mode (their attention takes the mask only in training mode), on random
   latents and labels: their forward's draws (the label-drop uniforms, the logit-normal times from scipy,
   each cell's noise) are recorded and handed to ours. Compared: the velocities of the block-causal pass over
   all cells and the loss.
4. Sampling in eval mode with the preset's cfg and steps: their ``sample_tokens`` draws each cell's initial
   noise and one noise per SDE step (drawn here in float32 and widened to their float64, so that ours, float32,
   is the same numbers); they are handed to our ``sample_with_stats(noise=...)``. Compared: each cell of the
   sampled latents. The transformer's work (passes and token rows) is counted on both sides.

Differences are max |ours - theirs| and that divided by max |theirs|; the exit code is 1 when a velocity or
the loss exceeds ``--tolerance`` or a sampled cell ``--sample-tolerance``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from flowar.xar import XAR, convert_released_xar_state_dict, to_cells
from flowar.xar_config import XARConfig, get_xar_preset
from tools.parity_flowar import Row, _check_draws, _torchvision_stub_if_absent, _wrap_method, compare, format_table
from tools.parity_var import init_statistics
from vae.files import read_torch_state_dict

# Their builder of each preset.
BUILDERS = {"xar-b": "xar_base", "xar-l": "xar_large", "xar-h": "xar_huge"}
SMALL_DEPTHS = dict(encoder_depth=2, decoder_depth=2)
REFERENCE_MODULES = ("xar", "sampler", "rope", "flow")
# The acceptance bounds of this port. Velocities: float32 of the same weights, computed in another order
# (per-cell attention calls vs one masked call, a broadcast vs a repeated adaLN, the clean cell fed in its own
# pass), about 1e-6 relative after the deepest stack. Sampled latents: 40 to 50 SDE steps per cell, each
# evaluation feeding the next, on a random network far less smooth than a trained one.
DEFAULT_TOLERANCE = 1e-5
DEFAULT_SAMPLE_TOLERANCE = 1e-4
LABEL_DROP = 0.5  # both sides, so that the null class is exercised in the training pass


# ---------------------------------------------------------------------------------------- environment
class _Unavailable(types.ModuleType):
    """Stands in for ``flash_attn``: their ``xar.py`` imports ``flash_attn_func`` and never calls it."""

    def __init__(self):
        super().__init__("flash_attn")

        def flash_attn_func(*args, **kwargs):
            raise RuntimeError("flash_attn is a stand-in of tools.parity_xar; the reference was not expected to call it")

        self.flash_attn_func = flash_attn_func


def checkout_root(reference) -> Path:
    """The resolved folder ``reference``; a FileNotFoundError naming --reference unless it holds their modules."""
    root = Path(reference).expanduser().resolve()
    needed = [f"models/{name}.py" for name in REFERENCE_MODULES]
    if not all((root / name).is_file() for name in needed):
        raise FileNotFoundError(f"--reference must be a checkout of OliverRensu/xAR holding {', '.join(needed)}; "
                                f"got {root}")
    return root


def import_reference(reference, *, timm_path=None) -> dict[str, types.ModuleType]:
    """Their ``models.xar`` (and the modules it imports) from the checkout ``reference``, by name."""
    root = checkout_root(reference)
    if timm_path is not None:
        timm_root = Path(timm_path).expanduser().resolve()
        if not (timm_root / "timm").is_dir():
            raise FileNotFoundError(f"--timm-path must be a folder that holds the timm package; got {timm_root}")
        sys.path.insert(0, str(timm_root))
    loaded = sys.modules.get("models")
    if loaded is not None and not any(Path(p).resolve() == root / "models" for p in getattr(loaded, "__path__", [])):
        raise ImportError(f"another package named 'models' is already imported ({loaded}); run in a fresh process")
    if loaded is None:
        package = types.ModuleType("models")
        package.__path__ = [str(root / "models")]
        sys.modules["models"] = package
    if importlib.util.find_spec("flash_attn") is None and "flash_attn" not in sys.modules:
        sys.modules["flash_attn"] = _Unavailable()
    try:
        with _torchvision_stub_if_absent():
            importlib.import_module("models.xar")
    except ModuleNotFoundError as err:
        hint = " (install it or pass --timm-path FOLDER)" if err.name and err.name.split(".")[0] == "timm" else ""
        raise ImportError(f"the reference code needs the module {err.name!r}{hint}") from err
    modules = {name: sys.modules[f"models.{name}"] for name in REFERENCE_MODULES}
    for name, module in modules.items():
        if Path(module.__file__).resolve() != root / "models" / f"{name}.py":
            raise ImportError(f"models.{name} came from {module.__file__}, not from --reference {root}")
    return modules


@contextlib.contextmanager
def cuda_calls_as_noop():
    """``Tensor.cuda()`` and ``Module.cuda()`` return their object unchanged while CUDA is unavailable (their
    code moves freshly made tensors with it; here they are on the CPU already, with the model); restored on
    exit. With CUDA nothing is patched."""
    if torch.cuda.is_available():
        yield
        return
    tensor_cuda, module_cuda = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = tensor_cuda, module_cuda


class _DrawingTorch:
    """Stands in for the name ``torch`` inside their modules: records ``rand``, ``randn`` and ``randn_like``.

    ``randn_like`` of a float64 tensor (their SDE's step noise) is drawn in float32 and widened, so that the same
    numbers exist in our float32 noise; every other draw is the real call's result."""

    RECORDED = ("rand", "randn", "randn_like")

    def __init__(self, real):
        self._real = real
        self.draws: list[tuple[str, torch.Tensor]] = []

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self.RECORDED:
            return attr

        def draw(*args, **kwargs):
            if name == "randn_like" and args[0].dtype == torch.float64 and not kwargs:
                like = args[0]
                out = self._real.randn(like.shape, device=like.device, dtype=torch.float32).to(torch.float64)
            else:
                out = attr(*args, **kwargs)
            self.draws.append((name, out.detach().clone()))
            return out

        return draw


@contextlib.contextmanager
def drawing(namespaces):
    """Within the block, their modules' ``torch`` is a :class:`_DrawingTorch`; yields its list of draws."""
    proxy = _DrawingTorch(torch)
    saved = [(ns, ns.torch) for ns in namespaces]
    for ns, _ in saved:
        ns.torch = proxy
    try:
        yield proxy.draws
    finally:
        for ns, original in saved:
            ns.torch = original


@contextlib.contextmanager
def counting_calls(obj, name: str, sink: list):
    """Append the token rows (batch x tokens of the first argument) of every call of ``obj.name`` to ``sink``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        sink.append(args[0].shape[0] * args[0].shape[1])
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


# ---------------------------------------------------------------------------------------- the two models
def reference_config(preset: str, *, small: bool) -> XARConfig:
    """Our config of the model the tool builds: no dropout, label drop 0.5 (their training forward drops labels
    with its own uniforms, which the tool hands to ours)."""
    overrides = dict(attn_dropout=0.0, proj_dropout=0.0, label_drop=LABEL_DROP)
    if small:
        overrides.update(SMALL_DEPTHS)
    return get_xar_preset(preset, **overrides)


def build_reference(xar_module, preset: str, config: XARConfig, *, small: bool) -> nn.Module:
    """Their model for ``preset``, or its --small version (described by ``config``)."""
    common = dict(img_size=16 * config.latent_side, vae_stride=16, patch_size=1, vae_embed_dim=config.token_dim,
                  label_drop_prob=config.label_drop, class_num=config.num_classes, attn_dropout=0.0, proj_dropout=0.0)
    if not small:
        return getattr(xar_module, BUILDERS[preset])(**common)
    c = config
    return xar_module.xAR(encoder_embed_dim=c.width, encoder_depth=c.encoder_depth, encoder_num_heads=c.num_heads,
                          decoder_embed_dim=c.width, decoder_depth=c.decoder_depth, decoder_num_heads=c.num_heads,
                          mlp_ratio=c.mlp_ratio, **common)


@torch.no_grad()
def randomize_(model: nn.Module, *, generator: torch.Generator) -> None:
    """Full-scale random values in every parameter: Linear weights of unit gain, norm gains around 1, everything
    else (biases, the class table, positions) of std 0.3."""
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 2 and name != "class_emb.weight":  # every Linear's weight
            param.copy_(noise / math.sqrt(param.shape[1]))
        elif name.endswith(("norm.weight", "_ln.weight")):
            param.copy_(1 + 0.3 * noise)
        else:
            param.copy_(0.3 * noise)


@dataclass
class Transfer:
    """How their weights went into ours."""

    path: str
    dropped: list[str]  # their keys the converter checked and dropped (blocks folded into one pattern)


def ours_from_reference(reference: nn.Module, config: XARConfig, folder: Path, checkpoint=None) -> tuple[XAR, Transfer]:
    """Our xAR from their weights through a ``.pth`` file (``checkpoint``, or their state_dict written to
    ``folder``) and ``XAR.from_released``."""
    path = Path(checkpoint) if checkpoint else folder / "reference_xar.pth"
    if not checkpoint:
        torch.save(reference.state_dict(), path)
    ours = XAR.from_released(path, config)
    state = read_torch_state_dict(path)
    dropped = sorted(set(state) - set(convert_released_xar_state_dict(state, config)))
    shown = sorted({key if "_blocks." not in key else
                    key.split("_blocks.")[0] + "_blocks.{i}." + key.split(".", 2)[2] for key in dropped})
    return ours, Transfer(path=str(path), dropped=shown)


# ---------------------------------------------------------------------------------------- comparisons
def compare_training(modules, reference, ours: XAR, latents, labels, *, seed: int) -> tuple[list[Row], list[bool]]:
    """Velocities of the all-cells pass and the loss on their forward's draws; also which labels were dropped."""
    c = ours.config
    batch, cells = latents.shape[0], c.num_cells
    reference.train()
    ours.train()
    their_v, their_times, our_v = [], [], []
    torch.manual_seed(seed)
    with torch.no_grad(), cuda_calls_as_noop(), drawing([modules["xar"]]) as draws, \
            _wrap_method(reference, "forward_mae_decoder", their_v), \
            _wrap_method(reference, "sample_logit_normal", their_times):
        their_loss = reference(latents, labels)
    expected = [("rand", (batch,))] + [("randn_like", (batch, c.cell_tokens, c.token_dim))] * cells
    _check_draws(draws, expected, "training forward")
    drop_mask = draws[0][1] < reference.label_drop_prob
    times = their_times[0].reshape(cells, batch).T  # theirs is cell-major: cell k's times are rows k*B .. k*B+B-1
    noise = torch.stack([n for _, n in draws[1:]], dim=1)  # (B, K, c*c, C)
    with torch.no_grad(), _wrap_method(ours, "run_cells", our_v):
        our_loss = ours(latents, labels, drop_mask=drop_mask, cell_times=times, cell_noise=noise).loss
    rows = [compare("velocities, all cells (block-causal pass)", our_v[0], their_v[0]),
            compare("training loss", our_loss, their_loss)]
    return rows, drop_mask.tolist()


@dataclass
class Work:
    """Transformer passes and token rows of one sampling run."""

    passes: int
    rows: int


def sample_reference(modules, reference, config: XARConfig, labels, *, cfg: float, steps: int,
                     record: bool = True) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Their ``sample_tokens`` of ``labels`` (the model's mode is the caller's) and, with ``record``, their draws
    in the form our ``sample_with_stats(noise=...)`` takes: per cell (B, steps, c*c, C), the initial noise and
    then one per SDE step (their float64 step noise drawn in float32, see :class:`_DrawingTorch`); else None."""
    c = config
    batch, cells = labels.shape[0], c.num_cells
    recording = drawing([modules["xar"], modules["sampler"]]) if record else contextlib.nullcontext()
    with torch.no_grad(), cuda_calls_as_noop(), recording as draws:
        latents = reference.sample_tokens(num_steps=steps, cfg=cfg, label=labels)
    if not record:
        return latents, None
    shape = (batch, c.cell_tokens, c.token_dim)
    _check_draws(draws, ([("randn", shape)] + [("randn_like", shape)] * (steps - 1)) * cells, "sampler")
    return latents, [torch.stack([n.float() for _, n in draws[k * steps:(k + 1) * steps]], dim=1) for k in range(cells)]


def compare_sampling(modules, reference, ours: XAR, labels, *, cfg: float, steps: int,
                     seed: int) -> tuple[list[Row], Work, Work]:
    """Their ``sample_tokens`` against our ``sample_with_stats`` on the same noise, cell by cell."""
    c = ours.config
    batch, cells = labels.shape[0], c.num_cells
    reference.eval()
    ours.eval()
    calls: list[int] = []
    torch.manual_seed(seed)
    with counting_calls(reference, "sample_inference", calls):
        their_latents, noise = sample_reference(modules, reference, c, labels, cfg=cfg, steps=steps)
    out = ours.sample_with_stats(labels, solver="sde", guidance_scale=cfg, steps=steps, noise=noise)
    ours_cells = to_cells(out.latents, c.cell_side).chunk(cells, dim=1)
    theirs_cells = to_cells(their_latents.float(), c.cell_side).chunk(cells, dim=1)
    rows = [compare(f"sampled latents, cell {k} (cfg {ours.sampling_options(guidance_scale=cfg).weight_at(k, cells):.3g})",
                    o, t) for k, (o, t) in enumerate(zip(ours_cells, theirs_cells))]
    rows.append(compare("sampled latents (B, C, S, S)", out.latents, their_latents))
    guided = cfg != 1.0
    feeds = (cells - 1) * (2 if guided else 1) * batch * c.cell_tokens  # the clean context cells, fed once each
    ours_work = Work(passes=out.nfe + cells - 1, rows=out.head_rows + feeds)
    return rows, Work(passes=len(calls), rows=sum(calls)), ours_work


# ---------------------------------------------------------------------------------------- report
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="checkout of OliverRensu/xAR (holds models/xar.py)")
    parser.add_argument("--preset", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--small", action="store_true", help="the preset's width and heads, 2 + 2 blocks")
    parser.add_argument("--checkpoint", default=None, help="released xAR-{B,L,H}.pth (default: random weights)")
    parser.add_argument("--timm-path", default=None, help="folder holding timm, if timm is not installed")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=None, help="guidance of the last cell (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="SDE steps per cell (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted relative difference of the velocities and the loss (default "
                             f"{DEFAULT_TOLERANCE:g})")
    parser.add_argument("--sample-tolerance", type=float, default=DEFAULT_SAMPLE_TOLERANCE,
                        help=f"largest accepted relative difference of the sampled latents (default "
                             f"{DEFAULT_SAMPLE_TOLERANCE:g})")
    parser.add_argument("--skip-sampling", action="store_true", help="compare the training pass only")
    args = parser.parse_args(argv)
    if args.batch < 2:
        # Their squeeze() calls drop the batch dimension of a single image (clusterify, the class embedding).
        parser.error(f"--batch must be >= 2 (the reference squeezes a batch of one away), got {args.batch}")
    if args.cfg is not None and args.cfg < 1.0:
        parser.error(f"--cfg must be >= 1: the reference guides only above 1; got {args.cfg}")
    if args.steps is not None and args.steps < 3:
        # With 2 steps their last step still counts as the first and feeds the previous cell again.
        parser.error(f"--steps must be >= 3 for the reference sampler, got {args.steps}")
    if args.small and args.checkpoint:
        parser.error("--small builds a reduced model; a released --checkpoint does not fit it")
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
    cfg = config.sampling.guidance_scale if args.cfg is None else args.cfg
    steps = config.sampling.steps if args.steps is None else args.steps
    torch.manual_seed(args.seed)
    reference = build_reference(modules["xar"], args.preset, config, small=args.small)
    init_worst, init_odd = init_statistics(reference, XAR(config))
    if args.checkpoint:
        reference.load_state_dict(read_torch_state_dict(args.checkpoint), strict=True)
    else:
        randomize_(reference, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as folder:
        ours, transfer = ours_from_reference(reference, config, Path(folder), args.checkpoint)
    reference.to(device)
    ours.to(device)

    size = "small" if args.small else "full size"
    print(f"preset {args.preset} ({size}): width {config.width}, {config.encoder_depth}+{config.decoder_depth} blocks, "
          f"{config.num_heads} heads of {config.head_dim}; {config.num_cells} cells of {config.cell_side}x"
          f"{config.cell_side}; {sum(p.numel() for p in ours.parameters()):,} parameters (theirs "
          f"{sum(p.numel() for p in reference.parameters()):,}); device {device}")
    print(f"init (before replacing their weights): worst |log(std ours / std theirs)| over tensors {init_worst:.3f}; "
          f"zero on one side only: {', '.join(init_odd) or 'none'}")
    print(f"weights: {args.checkpoint or 'random, full scale'} into ours via XAR.from_released; dropped after "
          f"checks: {', '.join(transfer.dropped) or 'none'}")

    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch, config.token_dim, config.latent_side, config.latent_side,
                          generator=generator).to(device)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=generator).to(device)
    rows, dropped = compare_training(modules, reference, ours, latents, labels, seed=args.seed)
    print(f"batch {args.batch}, labels {labels.tolist()}, dropped to the null class in the training pass: {dropped}")
    print(f"sampling: cfg {cfg:g} ramped over the cells, {steps} SDE steps per cell\n")
    print(format_table(rows, args.tolerance))
    failed = [r.name for r in rows if not r.ok(args.tolerance)]
    if not args.skip_sampling:
        sample_rows, theirs, ours_work = compare_sampling(modules, reference, ours, labels, cfg=cfg, steps=steps,
                                                          seed=args.seed + 1)
        print()
        print(format_table(sample_rows, args.sample_tolerance))
        print(f"\n{'transformer work':<28} {'passes':>7} {'token rows':>11}")
        print(f"{'theirs':<28} {theirs.passes:>7} {theirs.rows:>11}")
        print(f"{'ours (evaluations + feeds)':<28} {ours_work.passes:>7} {ours_work.rows:>11}")
        failed += [r.name for r in sample_rows if not r.ok(args.sample_tolerance)]
    print("\n" + ("PARITY FAILED: " + ", ".join(failed) if failed else "parity: all within tolerance"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
