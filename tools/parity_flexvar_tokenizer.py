"""Parity check of our FlexVAR tokenizer (``vae.flexvq``) against the authors' code, on the same weights.

    python -m tools.parity_flexvar_tokenizer --reference /path/to/FlexVAR
    python -m tools.parity_flexvar_tokenizer --reference /path/to/FlexVAR --small
    python -m tools.parity_flexvar_tokenizer --reference /path/to/FlexVAR --checkpoint FlexVAE.pth

``--reference`` is a checkout of jiaosiyu1999/FlexVAR. Only ``models/vq_llama.py`` (LlamaGen's tokenizer, which
imports nothing but torch) is loaded, by file path under a private module name: their ``models/__init__.py``,
whose builder replaces ``reset_parameters`` of ``nn.Linear``, ``nn.Conv2d``, the norms, ... process-wide, never
runs. Those methods are recorded before the import and checked after the construction anyway; if anything
changed them, the originals are put back and the run says so. Their trainer (``encode_var_wo_firstL``) and
sampler (``autoregressive_infer_cfg``) are not importable without the whole training stack, so the few steps of
theirs that touch the tokenizer are spelled out below around calls into their ``VQModel``.

What it does:

1. Builds their ``VQModel`` as their builder does (VQ-16 layout, V 8912, 32-channel codes; ``--small``: their
   ``Encoder``/``Decoder`` at width 32, ch_mult 1, 2, 2, one resnet per level, V 512, 64 px), with torch's
   default init seeded by ``--seed``; randomises GroupNorm affine parameters, biases and the codebook (random
   directions, so that the cosine search picks hundreds of different codes). ``--checkpoint`` loads the
   authors' file instead. Their ``state_dict()`` (with its ``quantize.codebook_used`` buffer) is written to a
   ``.pth`` under ``"model"`` and read back by ``FlexVQVAE.from_released``: the released-file path, strict.
2. On random images in [-1, 1]: the encoder features (their ``encode_conti``); the ids at every side of the
   released list 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 and of a list no released model uses, 1, 2, 4, 7, 11, 16, as their
   trainer makes them (area resize of the features, then their ``quantize``), against ours from the images and
   from their features (every id must be identical); the teacher-forcing inputs (their bicubic of the quantizer's
   output) and the sampling path's next input (their normalised embedding of the ids, bicubic) for both lists;
   and the images decoded from the last scale (their ``decode_code``).
3. The cosine search on near-ties (random features almost never come within float32 rounding of two codes):
   both codebooks set to random directions at four lengths each, vectors on those directions, through their
   ``quantize`` and our ``quantize_features``; a search by argmax of the cosine differs here on many ids.

Differences: max |ours - theirs| and that divided by max |theirs|; exit code 1 when a relative difference
exceeds ``--tolerance`` or any id differs. float32 throughout, as their trainer encodes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools import parity_var
from tools.parity_flowar import Row, compare, format_table
from vae.files import read_torch_state_dict
from vae.flexvq import FlexVQConfig, FlexVQVAE, get_flexvq_preset

RELEASED_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
UNSEEN_SCALES = (1, 2, 4, 7, 11, 16)  # not a list any released model samples with; ends at the latent side
# --small: their Encoder/Decoder take ch, ch_mult and num_res_blocks; GroupNorm stays at their fixed 32 groups.
SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, codebook_size=512, code_dim=16,
             image_size=64)
# float32 carries 24 bits; the CNN is ~40 layers deep and both sides run the same ops except the attention
# (theirs: bmm + softmax, ours: scaled_dot_product_attention) and SiLU (x * sigmoid(x) vs the fused kernel),
# a few ulps per layer. 1e-4 relative leaves two orders of magnitude for that and fails on any formula difference.
DEFAULT_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------- environment
def import_reference(reference) -> types.ModuleType:
    """Their ``models/vq_llama.py`` from the checkout ``reference``, loaded by path (no package, no builder)."""
    root = Path(reference).expanduser().resolve()
    file = root / "models" / "vq_llama.py"
    if not file.is_file():
        raise FileNotFoundError(f"--reference must be a checkout of jiaosiyu1999/FlexVAR holding models/vq_llama.py; "
                                f"got {root}")
    spec = importlib.util.spec_from_file_location("flexvar_reference_vq_llama", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- the two models
def reference_config(*, small: bool) -> FlexVQConfig:
    return get_flexvq_preset("flexvae", **(SMALL if small else {}))


def build_reference(vq_llama, config: FlexVQConfig) -> nn.Module:
    """Their VQModel for ``config`` (the codebook flags as their builder leaves them: L2 norm, usage buffer)."""
    args = vq_llama.ModelArgs(codebook_size=config.codebook_size, codebook_embed_dim=config.code_dim,
                              encoder_ch_mult=list(config.ch_mult), decoder_ch_mult=list(config.ch_mult),
                              z_channels=config.z_channels)
    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints its parameter count
        model = vq_llama.VQModel(args)
    if (config.ch, config.num_res_blocks) != (128, 2):  # VQModel passes neither on; their classes take both
        model.encoder = vq_llama.Encoder(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                                         z_channels=config.z_channels)
        model.decoder = vq_llama.Decoder(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                                         z_channels=config.z_channels)
    return model.eval()


@torch.no_grad()
def randomize_(reference: nn.Module, *, generator: torch.Generator) -> None:
    """Non-trivial norms and biases (torch's init leaves them 1 and near 0) and random code directions."""
    for name, p in reference.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        elif p.ndim == 1:  # GroupNorm scales
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    codes = reference.quantize.embedding.weight
    codes.copy_(torch.randn(codes.shape, generator=generator))


def ours_through_release_file(reference: nn.Module, config: FlexVQConfig) -> tuple[FlexVQVAE, list[str]]:
    """Their state dict written as a released file and read by ``FlexVQVAE.from_released``; also the keys of
    theirs that ours does not keep."""
    state = reference.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "FlexVAE.pth"
        torch.save({"model": state}, path)
        ours = FlexVQVAE.from_released(path, config)
    return ours, sorted(set(state) - set(ours.state_dict()))


# ---------------------------------------------------------------------------------------- their recipes
@torch.no_grad()
def their_targets(reference: nn.Module, features: torch.Tensor, scales) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Their trainer's per-scale ids (B, s*s) and teacher-forcing inputs from ``encode_conti`` features: area
    resize, their quantizer, its output bicubic-resized to the next side."""
    ids, inputs = [], []
    for k, side in enumerate(scales):
        quant, _, info = reference.quantize(F.interpolate(features.clone(), size=(side, side), mode="area"))
        ids.append(info[-1].view(quant.shape[0], -1))
        if k + 1 < len(scales):
            nxt = scales[k + 1]
            inputs.append(F.interpolate(quant, size=(nxt, nxt), mode="bicubic").reshape(*quant.shape[:2], -1))
    return ids, torch.cat(inputs, dim=2).permute(0, 2, 1)


@torch.no_grad()
def their_next_input(reference: nn.Module, ids: torch.Tensor, side: int, next_side: int) -> torch.Tensor:
    """Their sampler's next input from one scale's ids (B, s*s): normalised codes, bicubic, token-major."""
    codes = F.normalize(reference.quantize.embedding.weight, p=2, dim=-1)
    current = codes[ids].reshape(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(current, size=(next_side, next_side), mode="bicubic").flatten(2).permute(0, 2, 1)


# ---------------------------------------------------------------------------------------- comparisons
def id_row(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> Row:
    wrong = int((ours.flatten(1) != theirs).sum())
    return Row(name, tuple(theirs.shape), wrong, wrong, exact=True)


def worst(rows: list[Row], name: str) -> Row:
    row = max(rows, key=lambda r: r.max_rel)
    return Row(name, row.shape, row.max_abs, row.max_rel)


@torch.no_grad()
def compare_all(reference: nn.Module, ours: FlexVQVAE, images: torch.Tensor) -> tuple[list[Row], dict]:
    features = reference.encode_conti(images)
    rows = [compare("encoder features", ours.encode_features(images), features)]
    used = {}
    for label, scales in (("released", RELEASED_SCALES), ("unseen", UNSEEN_SCALES)):
        ids, inputs = their_targets(reference, features, scales)
        if label == "released":
            last = ids[-1]
        used[scales] = [int(t.unique().numel()) for t in ids]
        from_images = ours.encode_indices(images, list(scales))
        from_features = ours.indices_from_features(features, list(scales))
        for side, mine, other, theirs in zip(scales, from_images, from_features, ids):
            rows.append(id_row(f"ids, {label} list, side {side} (from images)", mine, theirs))
            rows.append(id_row(f"ids, {label} list, side {side} (their features)", other, theirs))
        maps = [t.view(t.shape[0], s, s) for t, s in zip(ids, scales)]
        rows.append(compare(f"teacher-forcing inputs, {label} list", ours.teacher_forcing_inputs(maps, list(scales)),
                            inputs))
        steps = [compare("", ours.next_input(maps[k], scales[k + 1]),
                         their_next_input(reference, ids[k], scales[k], scales[k + 1]))
                 for k in range(len(scales) - 1)]
        rows.append(worst(steps, f"sampling next input, {label} list, worst scale"))
    side = RELEASED_SCALES[-1]
    rows.append(compare("decoded images from the last scale", ours.decode_indices(last.view(-1, side, side)),
                        reference.decode_code(last, shape=[last.shape[0], ours.code_dim, side, side])))
    return rows, used


@torch.no_grad()
def compare_near_ties(reference: nn.Module, ours: FlexVQVAE, *, batch: int, generator: torch.Generator) -> Row:
    """Ids on vectors that lie within float32 rounding of several codes. Random features almost never do, so
    the checks above would pass a search by argmax of the cosine; here each code direction appears at four
    lengths and the vectors lie on those directions, and only the authors' arithmetic picks their ids."""
    vocab, dim, side = ours.codebook_size, ours.code_dim, ours.latent_side
    directions = torch.randn(-(-vocab // 4), dim, generator=generator)
    codes = (directions[:, None] * torch.tensor([1.0, 3.0, 0.1, 7.77])[None, :, None]).reshape(-1, dim)[:vocab]
    count = batch * side * side
    vectors = directions[torch.randint(0, len(directions), (count,), generator=generator)]
    vectors = vectors * (5 * torch.rand(count, 1, generator=generator)) + 1e-4 * torch.randn(count, dim, generator=generator)
    features = vectors.reshape(batch, side, side, dim).permute(0, 3, 1, 2)
    saved = [m.quantize.embedding.weight.clone() for m in (reference, ours)]
    for model in (reference, ours):
        model.quantize.embedding.weight.copy_(codes)
    try:
        theirs = reference.quantize(features)[2][-1].view(batch, -1)
        return id_row("ids on near-tie vectors (codes at four lengths)", ours.quantize_features(features, side), theirs)
    finally:
        for model, weight in zip((reference, ours), saved):
            model.quantize.embedding.weight.copy_(weight)


# ---------------------------------------------------------------------------------------- report
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="checkout of jiaosiyu1999/FlexVAR (holds models/vq_llama.py)")
    parser.add_argument("--checkpoint", default=None, help="the authors' FlexVAE.pth (default: random weights)")
    parser.add_argument("--small", action="store_true", help="width 32, ch_mult 1,2,2, V 512, 64 px: seconds")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
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
    config = reference_config(small=args.small)
    with parity_var.guard_nn_init() as changed:
        try:
            vq_llama = import_reference(args.reference)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        torch.manual_seed(args.seed)
        reference = build_reference(vq_llama, config)
    if changed:
        print(f"note: the reference changed reset_parameters of {', '.join(changed)}; the originals are restored")
    generator = torch.Generator().manual_seed(args.seed)
    side = config.image_size
    images = torch.rand(args.batch, config.image_channels, side, side, generator=generator) * 2 - 1
    if args.checkpoint:
        reference.load_state_dict(read_torch_state_dict(args.checkpoint, wrappers=("model",)), strict=True)
        ours = FlexVQVAE.from_released(args.checkpoint, config)
        dropped = sorted(set(reference.state_dict()) - set(ours.state_dict()))
    else:
        randomize_(reference, generator=generator)
        ours, dropped = ours_through_release_file(reference, config)
    size = "small" if args.small else "full size"
    print(f"FlexVAR tokenizer ({size}): ch {config.ch}, ch_mult {config.ch_mult}, z {config.z_channels}, "
          f"V {config.codebook_size}, code_dim {config.code_dim}; {sum(p.numel() for p in ours.parameters()):,} "
          f"parameters; images {args.batch}x{config.image_channels}x{side}x{side}")
    print(f"weights: {args.checkpoint or 'random (seed ' + str(args.seed) + ')'}, loaded by FlexVQVAE.from_released; "
          f"their keys not kept: {', '.join(dropped) or 'none'}\n")

    rows, used = compare_all(reference, ours, images)
    rows.append(compare_near_ties(reference, ours, batch=args.batch, generator=generator))
    print(format_table(rows, args.tolerance))
    for scales, counts in used.items():
        print(f"distinct codes picked per side {scales} (theirs): {counts}")
    failed = [r.name for r in rows if not r.ok(args.tolerance)]
    print("PARITY FAILED: " + ", ".join(failed) if failed else "parity: all within tolerance, all ids identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
