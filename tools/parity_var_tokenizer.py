"""Parity check of our multi-scale VQ tokenizer (``vae.msvq``) against the authors' VAR code, on the same weights.

    python -m tools.parity_var_tokenizer --reference /path/to/VAR
    python -m tools.parity_var_tokenizer --reference /path/to/VAR --checkpoint vae_ch160v4096z32.pth
    python -m tools.parity_var_tokenizer --reference /path/to/VAR --small

``--reference`` is a checkout of FoundationVision/VAR (``models/vqvae.py``, ``models/basic_vae.py``,
``models/quant.py``, ``dist.py``). Nothing of it is copied here; those files are imported from that folder.

Their global init patch. The authors' ``build_vae_var`` (``models/__init__.py``) replaces ``reset_parameters`` of
``nn.Linear``, ``nn.Conv2d``, the norms, ... with a no-op for the whole process. This tool never runs it: it
registers ``models`` as a bare package pointing at ``<reference>/models`` (its ``__init__.py``, and with it
the builder and the transformer's imports, is not executed), imports ``models.vqvae`` and constructs their
``VQVAE`` class directly. ``reset_parameters`` of those classes is recorded before the import and checked after
the construction; if anything changed it anyway, the originals are put back and the run says so.

What it does:

1. Builds their ``VQVAE`` for the preset (``vae_ch160v4096z32``: ch 160, V 4096, Cvae 32, 4 partially shared
   phi, the 256 px scales; ``--small``: ch 32, V 512, 64 px, scales 1, 2, 3, 4), with torch's default init
   seeded by ``--seed``, then randomises what that init leaves trivial (GroupNorm affine parameters, biases)
   and sets the codebook to random vectors of the encoder features' scale, so that the nearest-code search
   picks hundreds of different codes. ``--checkpoint`` loads the authors' file instead. Their
   ``state_dict()`` goes into ours through ``vae.msvq.convert_released_state_dict`` and a strict load: the
   released-file import path on their real key layout.
2. On random images in [-1, 1]: encoder features, per-scale indices (must be identical: the count of differing
   tokens is reported), f_hat, f_hat rebuilt from the indices, the transformer's teacher-forcing inputs, the
   sampling path scale by scale (their ``get_next_autoregressive_input`` against our ``accumulate``), and the
   decoded images.
3. The training forward (both in train mode): reconstruction, the VQ loss and the gradients of
   ``mse(reconstruction, images) + vq_loss`` with respect to the codebook, the phi convs, quant_conv and the
   encoder's first conv. Their quantizer asks ``torch.distributed`` for the world size, so a one-process gloo
   group is started for this step.

Differences: max |ours - theirs| and that divided by max |theirs|; exit code 1 when a relative difference
exceeds ``--tolerance`` or any index differs. float32 only: their quantizer allocates float32 buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools import parity_var
from tools.parity_flowar import Row, compare, format_table
from vae.files import load_state_strict, read_torch_state_dict
from vae.msvq import MultiScaleVQConfig, MultiScaleVQVAE, convert_released_state_dict, get_msvq_preset

# Classes whose reset_parameters the authors' builder disables process-wide.
PATCHED_CLASSES = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                   nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding, nn.GroupNorm)
# --small: their hard-wired CNN layout (ch_mult 1,1,2,2,4; two resnets per level; 32 groups) at width 32.
SMALL = dict(ch=32, codebook_size=512, scales=(1, 2, 3, 4))
SHARE_QUANT_RESI = {"partial": None, "shared": 1, "none": 0}  # their share_quant_resi (partial: phi_count)

# float32 carries 24 bits; the CNN is ~40 layers deep and both sides run the same ops except the attention
# (theirs: bmm + softmax, ours: scaled_dot_product_attention), which costs a few ulps per layer. 1e-4 relative
# leaves two orders of magnitude for that and fails on any real formula difference (O(1e-2) and up).
DEFAULT_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------- environment
def guard_nn_init():
    """:func:`tools.parity_var.guard_nn_init` for the classes the tokenizer's builder patches."""
    return parity_var.guard_nn_init(PATCHED_CLASSES)


def import_reference(reference) -> types.ModuleType:
    """Their ``models.vqvae`` from the checkout ``reference``, without running ``models/__init__.py``."""
    root = Path(reference).expanduser().resolve()
    for name in ("models/vqvae.py", "models/quant.py", "models/basic_vae.py", "dist.py"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"--reference must be a checkout of FoundationVision/VAR holding {name}; got {root}")
    loaded = sys.modules.get("models")
    if loaded is not None and [Path(p).resolve() for p in getattr(loaded, "__path__", [])] != [root / "models"]:
        raise ImportError(f"another package named 'models' is already imported ({loaded}); run in a fresh process")
    # A bare package object: submodules resolve inside <root>/models, __init__.py (the builder) never runs.
    package = types.ModuleType("models")
    package.__path__ = [str(root / "models")]
    sys.modules["models"] = package
    sys.path.insert(0, str(root))  # their quant.py imports the top-level ``dist``
    module = importlib.import_module("models.vqvae")
    if Path(module.__file__).resolve() != root / "models" / "vqvae.py":
        raise ImportError(f"models.vqvae came from {module.__file__}, not from --reference {root}")
    return module


# ---------------------------------------------------------------------------------------- the two models
def reference_config(preset: str, *, small: bool) -> MultiScaleVQConfig:
    config = get_msvq_preset(preset, **(SMALL if small else {}))
    layout = (config.ch_mult, config.num_res_blocks, config.norm_num_groups, config.image_channels)
    if layout != ((1, 1, 2, 2, 4), 2, 32, 3) or not (config.attn_last_level and config.attn_mid
                                                       and config.quant_conv_kernel == 3):
        raise ValueError(f"preset {preset!r} has a CNN layout the reference cannot build (theirs is hard-wired)")
    return config


def build_reference(vqvae_module, config: MultiScaleVQConfig) -> nn.Module:
    share = SHARE_QUANT_RESI[config.phi_sharing]
    return vqvae_module.VQVAE(
        vocab_size=config.codebook_size, z_channels=config.code_dim, ch=config.ch, beta=config.beta,
        using_znorm=False, quant_conv_ks=config.quant_conv_kernel, quant_resi=config.phi_ratio,
        share_quant_resi=config.phi_count if share is None else share, v_patch_nums=config.scales, test_mode=True,
    )


@torch.no_grad()
def randomize_(reference: nn.Module, images: torch.Tensor, *, generator: torch.Generator) -> None:
    """Non-trivial norms and biases, and a codebook of the features' scale (torch's N(0, 1) codes would be
    far larger than a random encoder's features, so only a handful would ever be nearest)."""
    for name, p in reference.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        elif p.ndim == 1:  # GroupNorm scales
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    f = reference.quant_conv(reference.encoder(images))
    codes = reference.quantize.embedding.weight
    codes.copy_(torch.randn(codes.shape, generator=generator) * f.std())


@dataclass
class WeightTransfer:
    copied: int
    missing: list[str]
    unexpected: list[str]


def ours_from_reference(reference: nn.Module, config: MultiScaleVQConfig) -> tuple[MultiScaleVQVAE, WeightTransfer]:
    """Our model with their weights, through the released-file converter and a strict load."""
    converted = convert_released_state_dict(reference.state_dict(), config)
    ours = MultiScaleVQVAE(config)
    own = set(ours.state_dict())
    transfer = WeightTransfer(len(converted), sorted(own - set(converted)), sorted(set(converted) - own))
    load_state_strict(ours, converted, source="the reference model's state_dict()")
    return ours.eval(), transfer


# ---------------------------------------------------------------------------------------- comparisons
def compare_indices(ours: list[torch.Tensor], theirs: list[torch.Tensor], scales) -> list[Row]:
    rows = []
    for k, (a, b) in enumerate(zip(ours, theirs)):
        wrong = int((a.flatten(1) != b).sum())
        rows.append(Row(f"indices, scale {scales[k]} (differing tokens)", tuple(b.shape), wrong, wrong, exact=True))
    return rows


@torch.no_grad()
def compare_inference(reference, ours: MultiScaleVQVAE, images: torch.Tensor) -> tuple[list[Row], list[int]]:
    scales = ours.scales
    rows = []
    f_theirs = reference.quant_conv(reference.encoder(images))
    rows.append(compare("encoder features f", ours.encode_features(images), f_theirs))
    idx_theirs = reference.img_to_idxBl(images)  # [(B, s*s)]
    idx_ours, f_hat_ours = ours.encode_to_indices_and_f_hat(images)
    rows += compare_indices(idx_ours, idx_theirs, scales)
    used = [int(t.unique().numel()) for t in idx_theirs]
    f_hat_theirs = reference.quantize.f_to_idxBl_or_fhat(f_theirs, to_fhat=True)[-1]
    rows.append(compare("f_hat (encoder path)", f_hat_ours, f_hat_theirs))
    # From their indices on both sides, so that the token paths are compared on the same tokens.
    maps = [t.view(t.shape[0], s, s) for t, s in zip(idx_theirs, scales)]
    codes = [reference.quantize.embedding(t).transpose(1, 2).reshape(t.shape[0], -1, s, s)
             for t, s in zip(idx_theirs, scales)]
    rows.append(compare("f_hat from indices", ours.indices_to_f_hat(maps),
                        reference.quantize.embed_to_fhat(codes, all_to_max_scale=True, last_one=True)))
    rows.append(compare("teacher-forcing inputs", ours.teacher_forcing_inputs(maps),
                        reference.quantize.idxBl_to_var_input(idx_theirs)))
    f_ours = f_ref = None
    worst_next = worst_f = None
    for k, (t, code) in enumerate(zip(maps, codes)):
        f_ours, next_ours = ours.accumulate(k, f_ours, t)
        if f_ref is None:
            f_ref = torch.zeros_like(f_ours)
        f_ref, next_ref = reference.quantize.get_next_autoregressive_input(k, len(scales), f_ref, code)
        if next_ours is not None:
            row = compare("", next_ours, next_ref.flatten(2).transpose(1, 2))
            worst_next = row if worst_next is None or row.max_rel > worst_next.max_rel else worst_next
        row = compare("", f_ours, f_ref)
        worst_f = row if worst_f is None or row.max_rel > worst_f.max_rel else worst_f
    worst_f.name, worst_next.name = "sampling path: f_hat, worst scale", "sampling path: next input, worst scale"
    rows += [worst_f, worst_next]
    rows.append(compare("decoded images (from f_hat)", ours.decode_f_hat(f_hat_theirs),
                        reference.fhat_to_img(f_hat_theirs)))
    rows.append(compare("decoded images (from indices)", ours.decode_indices(maps),
                        reference.idxBl_to_img(idx_theirs, same_shape=True, last_one=True)))
    return rows, used


def _gradients(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    return [params[n].grad.detach().clone() for n in names]


@contextlib.contextmanager
def single_process_group():
    """A one-process gloo group (their training forward calls torch.distributed.get_world_size())."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            tdist.destroy_process_group()


def compare_training(reference, ours: MultiScaleVQVAE, images: torch.Tensor) -> list[Row]:
    names = ["quantize.embedding.weight", "quant_conv.weight", "encoder.conv_in.weight"]
    names += [n for n, _ in ours.named_parameters() if n.startswith("quantize.quant_resi.")][:2]
    for model in (reference, ours):
        model.train()
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    with single_process_group(), warnings_off():
        rec_theirs, _, vq_theirs = reference(images)
    (F.mse_loss(rec_theirs, images) + vq_theirs).backward()
    out = ours(images, recon="l2")
    out.loss.backward()
    rows = [compare("training: reconstruction", out.reconstruction, rec_theirs),
            compare("training: vq loss (beta commit + codebook)", out.vq_loss, vq_theirs)]
    for name, a, b in zip(names, _gradients(ours, names), _gradients(reference, names)):
        rows.append(compare(f"training: grad {name}", a, b))
    for model in (reference, ours):
        model.eval()
        model.requires_grad_(False)
    return rows


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # their torch.cuda.amp.autocast(...) is deprecated and CPU-less
        yield


# ---------------------------------------------------------------------------------------- report
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="checkout of FoundationVision/VAR (holds models/vqvae.py)")
    parser.add_argument("--preset", default="vae_ch160v4096z32", choices=["vae_ch160v4096z32"])
    parser.add_argument("--checkpoint", default=None, help="the authors' vae_ch160v4096z32.pth (default: random weights)")
    parser.add_argument("--small", action="store_true", help="width 32, V 512, 64 px images: seconds instead of a minute")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="compare the inference paths only")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted max |diff| / max |theirs| (default {DEFAULT_TOLERANCE:g})")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.small and args.checkpoint:
        parser.error("--small builds a reduced model; the released --checkpoint does not fit it")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = reference_config(args.preset, small=args.small)
    with guard_nn_init() as changed:
        try:
            vqvae_module = import_reference(args.reference)
        except (FileNotFoundError, ImportError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        torch.manual_seed(args.seed)
        reference = build_reference(vqvae_module, config)
    if changed:
        print(f"note: the reference changed reset_parameters of {', '.join(changed)}; the originals are restored")
    generator = torch.Generator().manual_seed(args.seed)
    side = config.scales[-1] * config.downsample
    images = torch.rand(args.batch, 3, side, side, generator=generator) * 2 - 1
    if args.checkpoint:
        reference.load_state_dict(read_torch_state_dict(args.checkpoint, wrappers=("model", "state_dict")), strict=True)
    else:
        randomize_(reference, images, generator=generator)
    ours, transfer = ours_from_reference(reference, config)
    size = "small" if args.small else "full size"
    print(f"{args.preset} ({size}): ch {config.ch}, V {config.codebook_size}, Cvae {config.code_dim}, scales "
          f"{config.scales}, phi {config.phi_sharing} x{config.num_phi}; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters; images {args.batch}x3x{side}x{side}")
    print(f"weights: {args.checkpoint or 'random (seed ' + str(args.seed) + ')'}; {transfer.copied} tensors into ours; "
          f"missing: {', '.join(transfer.missing) or 'none'}; unexpected: {', '.join(transfer.unexpected) or 'none'}\n")

    start = time.perf_counter()
    rows, used = compare_inference(reference, ours, images)
    timings = [f"inference paths {time.perf_counter() - start:.1f} s"]
    if not args.skip_training:
        start = time.perf_counter()
        rows += compare_training(reference, ours, images)
        timings.append(f"training forward/backward {time.perf_counter() - start:.1f} s")
    print(format_table(rows, args.tolerance))
    print(f"\ndistinct codes picked per scale (theirs): {used}")
    print("; ".join(timings))
    failed = [r.name for r in rows if not r.ok(args.tolerance)]
    print("PARITY FAILED: " + ", ".join(failed) if failed else "parity: all within tolerance, all indices identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
