"""Parity check of our VAR transformer against the authors' code: the same weights and draws give the same numbers.

    python -m tools.parity_var --reference /path/to/VAR --depth 16
    python -m tools.parity_var --reference /path/to/VAR --depth 16 --small
    python -m tools.parity_var --reference /path/to/VAR --depth 16 --checkpoint var_d16.pth --vae-checkpoint vae_ch160v4096z32.pth

``--reference`` is a checkout of FoundationVision/VAR (``models/var.py``, ``models/basic_var.py``,
``models/helpers.py``, ``models/vqvae.py``, ``models/quant.py``, ``dist.py``). Nothing of it is copied here;
those files are imported from that folder (``huggingface_hub`` must be importable: their ``models/var.py``
imports it; a stand-in is used when it is not installed).

Their global init patch. The authors' ``build_vae_var`` (``models/__init__.py``) replaces ``reset_parameters``
of ``nn.Linear``, ``nn.LayerNorm``, the convs, ... with a no-op for the whole process. This tool never runs
it: ``models`` is registered as a bare package pointing at ``<reference>/models`` (its ``__init__.py`` is not
executed), and their ``VQVAE`` and ``VAR`` are constructed directly with the builder's arguments, followed by
their ``init_weights`` as the builder calls it. ``reset_parameters`` of the classes the builder patches is
recorded before the import and checked afterwards; if anything changed it anyway, the originals are put back
and the run says so.

What it does:

1. Builds their VQVAE (ch 160, V 4096, Cvae 32, 4 partially shared phi; ``--small``: ch 32) and their VAR for
   ``--depth`` (width 64 d, d heads, drop path 0.1 d / 24, L2-normalised attention, no shared AdaLN; depth 36
   uses shared AdaLN and the 512 px scales as the README's d36-s command; ``--small``: two blocks of the
   same head layout, width 128). Their init is compared with ours (the std of every tensor). Then every
   weight of theirs is replaced by random values of full scale (gates, biases and the per-head attention
   scales included, some heads above the cap of 100), because their init leaves the blocks almost closed
   (gates 1e-5) and would let a wrong block pass unnoticed. ``--checkpoint`` / ``--vae-checkpoint`` load the
   authors' files instead.
2. Their ``state_dict()`` is written to a ``.pth`` file and read back with ``VAR.from_released`` (the
   released-file path: ``weights_only=True``, the three constant buffers checked and dropped, strict keys);
   our tokenizer gets their VQVAE's weights through ``vae.msvq.convert_released_state_dict``.
3. Teacher forcing on random token maps: their ``idxBl_to_var_input`` against our ``teacher_forcing_inputs``;
   the logits of their ``forward`` against our ``logits`` on the same inputs (their forward drops labels from
   the global RNG even in eval mode; the tool seeds it, draws the same mask and hands it to ours; their
   ``cond_drop_rate`` is raised to 0.5 so that some labels are really dropped); our ``forward``'s loss
   against the cross entropy of their logits.
4. Sampling, both in eval mode: their ``autoregressive_infer_cfg(g_seed=seed)`` against our
   ``sample(generator=Generator().manual_seed(seed))``. Both draw the tokens of a scale with one
   ``torch.multinomial`` call on the (B * s * s, V) probabilities with their own generator, so with equal
   logits they consume the same randomness and draw the same ids: the tool compares the guided logits of every
   scale, the sampled ids (count of differing tokens), f_hat, and the decoded images. It is run with the FID
   settings (cfg 1.5, top-k 900, top-p 0.96, sampled) and greedily (top-k 1), which needs no shared draws.

Differences: max |ours - theirs| and that divided by max |theirs|; exit code 1 when a relative difference
exceeds ``--tolerance`` or a sampled id differs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.parity_flowar import Row, compare, format_table
from flowar import var as var_module
from heads import categorical as categorical_module
from vae.files import load_state_strict, read_torch_state_dict
from flowar.var import VAR
from flowar.var_config import SCALES_512, VARConfig
from vae.msvq import MultiScaleVQVAE, convert_released_state_dict, get_msvq_preset

DEPTHS = (16, 20, 24, 30, 36)
# The classes whose reset_parameters their build_vae_var replaces with a no-op.
PATCHED_BY_THEIR_BUILDER = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                            nn.ConvTranspose1d, nn.ConvTranspose2d)
# float32 carries 24 bits; the two sides compute the same formulas in a different order (per-scale attention
# calls vs one masked call, a gathered vs a repeated level embedding): 1.4e-6 relative at most at full d16.
# 2e-5 leaves an order of magnitude for that and still fails on subtle formula changes (GELU without the
# tanh approximation gives 7e-5 on the --small model, a wrong guidance ramp or attention cap far more).
DEFAULT_TOLERANCE = 2e-5
FID_SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96)  # [fid]: the authors' FID sampling, drawn
GREEDY_SETTINGS = dict(cfg=1.5, top_k=1, top_p=0.0)  # [greedy]: the argmax (no shared draws needed)


# ---------------------------------------------------------------------------------------- environment
@contextlib.contextmanager
def guard_nn_init(classes=PATCHED_BY_THEIR_BUILDER):
    """Record ``reset_parameters`` of ``classes`` (those their builder patches); on exit put back any that
    changed. Yields a list that holds the names of the classes that had been changed (empty when none was)."""
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in classes}
    changed: list[str] = []
    try:
        yield changed
    finally:
        for cls, original in saved.items():
            if cls.__dict__.get("reset_parameters") is not original:
                changed.append(cls.__name__)
                if original is None:
                    delattr(cls, "reset_parameters")
                else:
                    cls.reset_parameters = original


def import_reference(reference) -> dict[str, types.ModuleType]:
    """Their ``models.var``, ``models.vqvae`` and ``models.helpers`` from the checkout ``reference``, without
    running ``models/__init__.py`` (the builder that patches torch.nn)."""
    root = Path(reference).expanduser().resolve()
    if not (root / "models" / "var.py").is_file() or not (root / "dist.py").is_file():
        raise FileNotFoundError(
            f"--reference must be a checkout of FoundationVision/VAR holding models/var.py and dist.py; got {root}"
        )
    loaded = sys.modules.get("models")
    if loaded is not None and not any(Path(p).resolve() == root / "models" for p in getattr(loaded, "__path__", [])):
        raise ImportError(f"another package named 'models' is already imported ({loaded}); run in a fresh process")
    if importlib.util.find_spec("huggingface_hub") is None and "huggingface_hub" not in sys.modules:
        # Their models/var.py imports PyTorchModelHubMixin for a hub subclass this tool never builds.
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, str(root))  # for their top-level ``dist`` module
    if loaded is None:
        package = types.ModuleType("models")
        package.__path__ = [str(root / "models")]
        sys.modules["models"] = package
    modules = {name: importlib.import_module(f"models.{name}") for name in ("var", "vqvae", "helpers")}
    for name, module in modules.items():
        if Path(module.__file__).resolve() != root / "models" / f"{name}.py":
            raise ImportError(f"models.{name} came from {module.__file__}, not from --reference {root}")
    return modules


@contextlib.contextmanager
def quiet():
    """Their constructors print their configuration; keep the report readable."""
    with open("/dev/null", "w") as sink, contextlib.redirect_stdout(sink):
        yield


# ---------------------------------------------------------------------------------------- the two models
def reference_config(depth: int, *, small: bool) -> VARConfig:
    """Our config for the model the tool builds (their builder's arguments, or the --small reduction)."""
    overrides = {}
    if depth == 36:
        overrides = dict(scales=SCALES_512, shared_adaln=True, init_adaln_gamma=5e-6)
    if small:
        overrides.update(depth=2, width=128, num_heads=2, drop_path=0.1 * 2 / 24)
        return VARConfig(**overrides)
    return VARConfig.from_depth(depth, **overrides)


def build_reference(modules, config: VARConfig, *, vae_ch: int):
    """Their (VQVAE, VAR) as build_vae_var makes them, minus the global init patch."""
    with quiet():
        vae = modules["vqvae"].VQVAE(vocab_size=config.vocab_size, z_channels=config.code_dim, ch=vae_ch,
                                     test_mode=True, share_quant_resi=4, v_patch_nums=config.scales)
        model = modules["var"].VAR(
            vae_local=vae, num_classes=config.num_classes, depth=config.depth, embed_dim=config.width,
            num_heads=config.num_heads, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=config.drop_path,
            norm_eps=config.norm_eps, shared_aln=config.shared_adaln, cond_drop_rate=config.cond_drop_rate,
            attn_l2_norm=config.attn_l2_norm, patch_nums=config.scales,
            flash_if_available=False, fused_if_available=False,
        )
        model.init_weights(init_adaln=0.5, init_adaln_gamma=config.init_adaln_gamma, init_head=0.02, init_std=-1)
    return vae, model


def init_statistics(theirs: nn.Module, ours: nn.Module) -> tuple[float, list[str]]:
    """Worst |log(std ours / std theirs)| over the tensors both hold (with more than one element), and the
    names of tensors that are all zeros on one side only."""
    their_state, worst, odd = theirs.state_dict(), 0.0, []
    for name, tensor in ours.state_dict().items():
        ref = their_state.get(name)
        if ref is None or tensor.numel() < 2 or not tensor.is_floating_point():
            continue
        a, b = tensor.float().std().item(), ref.float().std().item()
        if a == 0 or b == 0:
            if (a == 0) != (b == 0):
                odd.append(name)
            continue
        worst = max(worst, abs(math.log(a / b)))
    return worst, odd


@torch.no_grad()
def randomize_(model: nn.Module, config: VARConfig, *, generator: torch.Generator) -> None:
    """Full-scale random weights, so that every block, gate, bias and head of the transformer matters."""
    for name, param in model.named_parameters():
        if name.endswith("scale_mul_1H11"):
            # log of per-head scales in [1, 150]; in every block head 0 is above the cap of 100 and head 1
            # just below it, so that a missing, misplaced or mis-valued cap shows
            values = torch.empty(param.shape).uniform_(0.0, math.log(150.0), generator=generator)
            values.view(-1)[:2] = torch.tensor([math.log(150.0), math.log(70.0)])[: values.numel()]
            param.copy_(values)
        elif param.ndim == 2 and "embed" not in name and "class_emb" not in name:
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
        else:  # biases, embeddings, positions, shared AdaLN offsets
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@dataclass
class WeightTransfer:
    """How their state went into ours."""

    copied: int
    dropped: list[str]  # their keys the converter drops on purpose (constant buffers)
    path: str  # the .pth file it went through


def ours_from_reference(reference: nn.Module, config: VARConfig, folder: Path) -> tuple[VAR, WeightTransfer]:
    """Our VAR with their weights, through a ``.pth`` file and ``VAR.from_released``."""
    state = reference.state_dict()
    path = folder / "reference_var.pth"
    torch.save(state, path)
    ours = VAR.from_released(path, config)
    kept = var_module.convert_released_var_state_dict(read_torch_state_dict(path), config)
    dropped = sorted(set(state) - set(kept))
    shown = [k for k in dropped if not k.startswith("blocks.")] + sorted({
        "blocks.{i}." + k.split(".", 2)[2] for k in dropped if k.startswith("blocks.")})
    return ours, WeightTransfer(copied=len(kept), dropped=shown, path=str(path))


def our_tokenizer(reference_vae: nn.Module, config: VARConfig, *, vae_ch: int) -> MultiScaleVQVAE:
    """Our MultiScaleVQVAE with their VQVAE's weights."""
    vq_config = get_msvq_preset("vae_ch160v4096z32", ch=vae_ch, scales=config.scales)
    tokenizer = MultiScaleVQVAE(vq_config)
    load_state_strict(tokenizer, convert_released_state_dict(reference_vae.state_dict(), vq_config),
                      source="their VQVAE's state_dict()")
    return tokenizer.eval()


# ---------------------------------------------------------------------------------------- comparisons
def compare_teacher_forcing(reference, reference_vae, ours: VAR, tokenizer, labels, *, seed: int) -> list[Row]:
    """Teacher-forcing inputs, logits and loss on random token maps, both in eval mode."""
    c = ours.config
    batch = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    indices = [torch.randint(0, c.vocab_size, (batch, s, s), generator=g) for s in c.scales]
    their_inputs = reference_vae.quantize.idxBl_to_var_input([i.flatten(1) for i in indices])
    our_inputs = tokenizer.teacher_forcing_inputs(indices)
    reference.eval()
    ours.eval()
    reference.cond_drop_rate = 0.5
    torch.manual_seed(seed)
    their_logits = reference(labels, their_inputs)
    torch.manual_seed(seed)  # their forward's one draw from the global RNG, repeated
    drop_mask = torch.rand(batch) < reference.cond_drop_rate
    our_logits = ours.logits(their_inputs, labels, drop_mask=drop_mask)
    targets = torch.cat([i.flatten(1) for i in indices], dim=1)
    their_loss = F.cross_entropy(their_logits.flatten(0, 1), targets.flatten())
    our_loss = ours(indices, labels, tokenizer=tokenizer, drop_mask=drop_mask).loss
    print(f"teacher forcing: labels {labels.tolist()}, dropped to the null class: {drop_mask.tolist()}")
    return [
        compare("teacher-forcing inputs (our tokenizer)", our_inputs, their_inputs),
        compare("logits, all scales", our_logits, their_logits),
        compare("loss (ours: forward; theirs: CE of logits)", our_loss, their_loss),
    ]


@contextlib.contextmanager
def _recording(namespace, name: str, sink: list, *, clone_arg: int | None = None):
    """Swap ``namespace.name`` for a wrapper that appends to ``sink`` a clone of its argument ``clone_arg``
    (taken before the call) or, when that is None, its return value."""
    original = getattr(namespace, name)

    def wrapper(*args, **kwargs):
        if clone_arg is not None:
            sink.append(args[clone_arg].detach().clone())
        out = original(*args, **kwargs)
        if clone_arg is None:
            sink.append(out)
        return out

    setattr(namespace, name, wrapper)
    try:
        yield
    finally:
        setattr(namespace, name, original)


@dataclass
class SamplingResult:
    rows: list[Row]
    differing_ids: int  # over all scales
    total_ids: int
    first_differing_scale: int | None
    mean_candidates: float  # tokens left per position by top-k / top-p on their logits, all scales


def compare_sampling(modules, reference, ours: VAR, tokenizer, labels, *, cfg: float, top_k: int,
                     top_p: float, seed: int, decode: bool, tag: str = "") -> SamplingResult:
    """Their autoregressive_infer_cfg against our sample with the same seed; logits per scale, ids, f_hat, images."""
    c = ours.config
    batch = labels.shape[0]
    reference.eval()
    ours.eval()
    their_logits, their_ids, their_fhat = [], [], []
    sampler = modules["var"].sample_with_top_k_top_p_

    def recording_sampler(logits, *args, **kwargs):
        their_logits.append(logits.detach().clone())  # before their in-place top-k / top-p masking
        ids = sampler(logits, *args, **kwargs)
        their_ids.append(ids[:, :, 0].clone())
        return ids

    modules["var"].sample_with_top_k_top_p_ = recording_sampler
    try:
        with _recording(reference.vae_quant_proxy[0], "get_next_autoregressive_input", their_fhat):
            their_images = reference.autoregressive_infer_cfg(batch, labels, g_seed=seed, cfg=cfg, top_k=top_k,
                                                              top_p=top_p, more_smooth=False)
    finally:
        modules["var"].sample_with_top_k_top_p_ = sampler
    our_logits = []
    with _recording(categorical_module, "filter_logits", our_logits, clone_arg=0):
        out = ours.sample(labels, tokenizer=tokenizer, var_cfg=cfg, top_k=top_k, top_p=top_p,
                          generator=torch.Generator().manual_seed(seed))
    rows, differing, first = [], 0, None
    for k, side in enumerate(c.scales):
        ours_k, theirs_k = out.indices[k].flatten(1), their_ids[k]
        diff = int((ours_k != theirs_k).sum())
        differing += diff
        if diff and first is None:
            first = k
    per_scale = [compare(f"guided logits, scale {s}x{s} [{tag}]", ours_k, theirs_k)
                 for s, ours_k, theirs_k in zip(c.scales, our_logits, their_logits)]
    rows.append(max(per_scale, key=lambda r: r.max_rel))  # the worst scale
    rows.append(compare(f"f_hat after the last scale [{tag}]", out.f_hat, their_fhat[-1][0]))
    if decode:
        our_images = tokenizer.decode_f_hat(out.f_hat).add(1).mul(0.5)
        rows.append(compare(f"decoded images in [0, 1] [{tag}]", our_images, their_images))
    # How much choice the draws had: a draw among one candidate would make equal ids trivial.
    candidates = torch.cat([torch.isfinite(categorical_module.filter_logits(t, top_k=top_k, top_p=top_p)).sum(-1).flatten()
                            for t in their_logits]).float().mean().item()
    return SamplingResult(rows, differing, batch * c.seq_len, first, candidates)


# ---------------------------------------------------------------------------------------- report
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="checkout of FoundationVision/VAR (holds models/var.py)")
    parser.add_argument("--depth", type=int, required=True, choices=DEPTHS)
    parser.add_argument("--small", action="store_true", help="two blocks of width 128 and a ch-32 tokenizer CNN")
    parser.add_argument("--checkpoint", default=None, help="their var_d{depth}.pth (default: random weights)")
    parser.add_argument("--vae-checkpoint", default=None, help="their vae_ch160v4096z32.pth (default: random)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted max |diff| / max |theirs| (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding the sampled f_hat to images")
    parser.add_argument("--skip-sampling", action="store_true", help="compare teacher forcing only")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.small and args.checkpoint:
        parser.error("--small builds a reduced model; a released --checkpoint does not fit it")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with guard_nn_init() as changed:
        try:
            modules = import_reference(args.reference)
        except (FileNotFoundError, ImportError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        config = reference_config(args.depth, small=args.small)
        vae_ch = 32 if args.small else 160
        torch.manual_seed(args.seed)
        reference_vae, reference = build_reference(modules, config, vae_ch=vae_ch)
    if changed:
        print(f"warning: reset_parameters of {', '.join(changed)} had been replaced; the originals are back")
    torch.set_grad_enabled(False)

    fresh = VAR(config)  # our own init, to compare with theirs before their weights are replaced
    init_worst, init_odd = init_statistics(reference, fresh)
    del fresh
    if args.checkpoint:
        reference.load_state_dict(read_torch_state_dict(args.checkpoint), strict=True)
    else:
        randomize_(reference, config, generator=torch.Generator().manual_seed(args.seed))
    if args.vae_checkpoint:
        reference_vae.load_state_dict(read_torch_state_dict(args.vae_checkpoint), strict=True)
    with tempfile.TemporaryDirectory() as folder:
        ours, transfer = ours_from_reference(reference, config, Path(folder))
    tokenizer = our_tokenizer(reference_vae, config, vae_ch=vae_ch)

    size = "small" if args.small else "full size"
    print(f"VAR depth {args.depth} ({size}): width {config.width}, {config.depth} blocks, {config.num_heads} heads, "
          f"shared AdaLN {config.shared_adaln}, scales {config.scales}; "
          f"{sum(p.numel() for p in ours.parameters()):,} parameters (theirs "
          f"{sum(p.numel() for p in reference.parameters()):,})")
    print(f"init (before replacing their weights): worst |log(std ours / std theirs)| over tensors "
          f"{init_worst:.3f}; zero on one side only: {', '.join(init_odd) or 'none'}")
    print(f"weights: {args.checkpoint or 'random, full scale'}; {transfer.copied} tensors into ours via "
          f"VAR.from_released; dropped after checks: {', '.join(transfer.dropped)}")
    print(f"tokenizer: {args.vae_checkpoint or 'their VQVAE init'} (ch {vae_ch}) into vae.msvq.MultiScaleVQVAE\n")

    g = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=g)
    start = time.perf_counter()
    rows = compare_teacher_forcing(reference, reference_vae, ours, tokenizer, labels, seed=args.seed)
    timings = [f"teacher forcing {time.perf_counter() - start:.1f} s"]
    id_failures = []
    if not args.skip_sampling:
        for name, settings in (("fid", FID_SETTINGS), ("greedy", GREEDY_SETTINGS)):
            start = time.perf_counter()
            result = compare_sampling(modules, reference, ours, tokenizer, labels, seed=args.seed + 1,
                                      decode=not args.no_decode, tag=name, **settings)
            timings.append(f"sampling, {name} {time.perf_counter() - start:.1f} s")
            rows += result.rows
            where = "" if result.first_differing_scale is None else \
                f" (first at scale {config.scales[result.first_differing_scale]})"
            settings_text = ", ".join(f"{k} {v:g}" for k, v in settings.items())
            print(f"sampled ids [{name}: {settings_text}]: {result.differing_ids} of {result.total_ids} differ{where}; "
                  f"{result.mean_candidates:.1f} candidate tokens per draw on average")
            if result.differing_ids:
                id_failures.append(name)
    print()
    print(format_table(rows, args.tolerance))
    print("\n" + "; ".join(timings))
    failed = [r.name for r in rows if not r.ok(args.tolerance)] + [f"sampled ids ({n})" for n in id_failures]
    print("PARITY FAILED: " + ", ".join(failed) if failed else "parity: all within tolerance, all sampled ids equal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
