"""Parity check of our FlexVAR transformer against the authors' code: the same weights and draws give the same numbers.

    python -m tools.parity_flexvar --reference /path/to/FlexVAR --depth 16
    python -m tools.parity_flexvar --reference /path/to/FlexVAR --depth 16 --small
    python -m tools.parity_flexvar --reference /path/to/FlexVAR --depth 16 --checkpoint FlexVARd16-epo179.pth --vae-checkpoint FlexVAE.pth

``--reference`` is a checkout of jiaosiyu1999/FlexVAR (``models/flexvar.py``, ``models/basic_var.py``,
``models/helpers.py``, ``models/vq_llama.py``, ``trainer.py``, ``dist.py``). Nothing of it is copied here: those
files are imported from that folder. ``models`` is registered as a bare package so that its ``__init__.py``
(the builder, which replaces ``reset_parameters`` of torch's layers for the whole process) never runs; their
``trainer.py`` is imported with stand-ins for the two logging and optimizer modules it imports but this tool
never calls (``utils.amp_sc``, ``utils.misc``), so that its own ``encode_var_wo_firstL`` makes the training
targets and inputs.

What it does:

1. Builds their ``VQModel`` (VQ-16, V 8912, Cvae 32; torch's default init, the codebook's random unit
   vectors) and their ``FlexVAR`` for ``--depth`` as ``build_vae_var`` does (width 64 d, d heads, drop path
   0.1 d / 24; ``--small``: two blocks of width 128), then replaces every weight of the transformer by random
   values of full scale (gates, biases, positions, per-head attention scales, some above the cap of 100).
   ``--checkpoint`` / ``--vae-checkpoint`` load the authors' files instead.
2. Their ``state_dict()`` goes through a ``.pth`` file into ``FlexVAR.from_released`` (weights_only, the two
   constant buffers checked and dropped, strict keys); their tokenizer's into ``vae.flexvq.FlexVQVAE`` through
   ``convert_released_flexvq_state_dict``.
3. Teacher forcing, for the released list of sides and for a list it was never trained on as such: their
   trainer's ``encode_var_wo_firstL`` on random images against our tokenizer's ``encode_indices`` and
   ``teacher_forcing_inputs`` (identical ids at every scale), then their ``forward`` (labels dropped from
   the global RNG; the tool repeats the draw and hands ours the mask) against our ``logits``, and the loss.
4. Sampling, seeded, with their FID settings (cfg 2.5, top-k 900, top-p 0.95, VAR's guidance, max_pn 16): their
   ``autoregressive_infer_cfg(g_seed=seed)`` against our ``sample(generator=Generator().manual_seed(seed))``
   over the released list, the 13-step list of their README (sides 7, 9, 12, 14 drawn greedily, guidance
   ramped past its end) and a 512 px list (sides above 16 greedy at full guidance): the guided logits of
   every scale, the ids (the count of differing tokens), and the decoded images.

Differences: max |ours - theirs| and that divided by max |theirs|; exit code 1 when a relative difference
exceeds ``--tolerance`` or an id differs.
"""

from __future__ import annotations

import argparse
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

from flowar.flexvar import FlexVAR, convert_released_flexvar_state_dict
from flowar.flexvar_config import FlexVARConfig
from heads import categorical as categorical_module
from tools.parity_flowar import Row, compare, format_table
from tools.parity_var import _recording, guard_nn_init, init_statistics, quiet, randomize_
from vae.files import load_state_strict, read_torch_state_dict
from vae.flexvq import FlexVQVAE, convert_released_flexvq_state_dict, get_flexvq_preset

DEPTHS = (16, 20, 24)
# The acceptance bound of this port: float32 logits of the same weights within 1e-5 relative.
DEFAULT_TOLERANCE = 1e-5
FID_SETTINGS = dict(cfg=2.5, top_k=900, top_p=0.95, max_pn=16)  # eval_c2i.py's defaults with the README's cfg
SIDE_LISTS = {
    "released": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "13 steps": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16),
    "unseen": (1, 2, 4, 7, 11, 16),
    "512 px": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32),
}
TEACHER_FORCING_LISTS = ("released", "unseen")
SAMPLING_LISTS = ("released", "13 steps", "512 px")


# ---------------------------------------------------------------------------------------- their code
def import_reference(reference) -> dict[str, types.ModuleType]:
    """Their ``models.flexvar``, ``models.vq_llama`` and ``trainer`` from the checkout ``reference``, without
    running ``models/__init__.py``."""
    root = Path(reference).expanduser().resolve()
    needed = ("models/flexvar.py", "models/vq_llama.py", "trainer.py", "dist.py")
    if not all((root / name).is_file() for name in needed):
        raise FileNotFoundError(f"--reference must be a checkout of jiaosiyu1999/FlexVAR holding {', '.join(needed)}; "
                                f"got {root}")
    for name in ("models", "utils", "trainer"):
        if name in sys.modules:
            raise ImportError(f"a module named {name!r} is already imported ({sys.modules[name]}); run in a fresh process")
    sys.path.insert(0, str(root))  # their top-level ``dist`` and ``trainer``
    package = types.ModuleType("models")
    package.__path__ = [str(root / "models")]
    sys.modules["models"] = package
    modules = {name: importlib.import_module(f"models.{name}") for name in ("flexvar", "vq_llama")}
    package.FlexVAR = modules["flexvar"].FlexVAR  # what trainer.py imports from models
    # trainer.py imports an optimizer wrapper and loggers; the methods this tool calls use neither.
    utils = types.ModuleType("utils")
    utils.__path__ = []
    amp_sc, misc = types.ModuleType("utils.amp_sc"), types.ModuleType("utils.misc")
    amp_sc.AmpOptimizer = type("AmpOptimizer", (), {})
    misc.MetricLogger = misc.TensorboardLogger = type("Unused", (), {})
    sys.modules.update({"utils": utils, "utils.amp_sc": amp_sc, "utils.misc": misc})
    modules["trainer"] = importlib.import_module("trainer")
    for name, module in modules.items():
        expected = root / ("trainer.py" if name == "trainer" else f"models/{name}.py")
        if Path(module.__file__).resolve() != expected:
            raise ImportError(f"{name} came from {module.__file__}, not from --reference {root}")
    return modules


def reference_config(depth: int, *, small: bool) -> FlexVARConfig:
    if small:
        return FlexVARConfig(depth=2, width=128, num_heads=2, drop_path=0.1 * 2 / 24)
    return FlexVARConfig.from_depth(depth)


def build_reference(modules, config: FlexVARConfig):
    """Their (VQModel, FlexVAR) as build_vae_var makes them, minus the global init patch and the file load."""
    with quiet():
        vae = modules["vq_llama"].VQ_models["VQ-16"](codebook_size=config.vocab_size,
                                                     codebook_embed_dim=config.code_dim).eval()
        model = modules["flexvar"].FlexVAR(
            vae_local=vae, num_classes=config.num_classes, depth=config.depth, embed_dim=config.width,
            num_heads=config.num_heads, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=config.drop_path,
            norm_eps=config.norm_eps, shared_aln=config.shared_adaln, cond_drop_rate=config.cond_drop_rate,
            token_dropout_p=0.05, attn_l2_norm=config.attn_l2_norm, patch_nums=config.scales,
            flash_if_available=False, fused_if_available=False,
        )
        model.init_weights(init_adaln=0.5, init_adaln_gamma=config.init_adaln_gamma, init_head=0.02, init_std=-1)
    return vae, model


def ours_from_reference(reference: nn.Module, config: FlexVARConfig, folder: Path) -> tuple[FlexVAR, list[str]]:
    """Our FlexVAR with their weights, through a ``.pth`` file and ``FlexVAR.from_released``; and the names of
    the buffers the converter dropped."""
    path = folder / "reference_flexvar.pth"
    state = reference.state_dict()
    torch.save(state, path)
    ours = FlexVAR.from_released(path, config)
    kept = convert_released_flexvar_state_dict(read_torch_state_dict(path))
    dropped = sorted(set(state) - set(kept))
    shown = [k for k in dropped if not k.startswith("blocks.")] + sorted({
        "blocks.{i}." + k.split(".", 2)[2] for k in dropped if k.startswith("blocks.")})
    return ours, shown


def our_tokenizer(reference_vae: nn.Module) -> FlexVQVAE:
    tokenizer = FlexVQVAE(get_flexvq_preset("flexvae"))
    load_state_strict(tokenizer, convert_released_flexvq_state_dict(reference_vae.state_dict()),
                      source="their VQModel's state_dict()")
    return tokenizer.eval()


# ---------------------------------------------------------------------------------------- comparisons
def compare_teacher_forcing(modules, reference, reference_vae, ours: FlexVAR, tokenizer, images, labels, *,
                            sides, tag: str, seed: int) -> tuple[list[Row], int]:
    """Targets, inputs, logits and loss of one list of sides; returns the rows and the count of differing ids."""
    trainer = types.SimpleNamespace(vae_local=reference_vae)  # the one attribute their method reads
    their_inputs, their_ids = modules["trainer"].VARTrainer.encode_var_wo_firstL(trainer, images, list(sides))
    our_ids = tokenizer.encode_indices(images, sides)
    flat_ids = torch.cat([i.flatten(1) for i in our_ids], dim=1)
    differing = int((flat_ids != their_ids).sum())
    our_inputs = tokenizer.teacher_forcing_inputs(our_ids, sides)
    reference.eval()
    ours.eval()
    reference.cond_drop_rate = 0.5  # so that some labels really are dropped
    batch = labels.shape[0]
    torch.manual_seed(seed)
    their_logits = reference(labels, their_inputs, list(sides))
    torch.manual_seed(seed)  # their forward's one draw from the global RNG, repeated
    drop_mask = torch.rand(batch) < reference.cond_drop_rate
    our_logits = ours.logits(their_inputs, labels, sides=sides, drop_mask=drop_mask)
    their_loss = F.cross_entropy(their_logits.flatten(0, 1), their_ids.flatten())
    features = tokenizer.encode_features(images)
    our_loss = ours(features, labels, tokenizer=tokenizer, scales=sides, drop_mask=drop_mask).loss
    print(f"teacher forcing [{tag}] sides {list(sides)}: {differing} of {their_ids.numel()} target ids differ; "
          f"labels dropped to the null class: {drop_mask.tolist()}")
    return [
        compare(f"teacher-forcing inputs [{tag}]", our_inputs, their_inputs),
        compare(f"logits, all scales [{tag}]", our_logits, their_logits),
        compare(f"loss (ours: forward on features) [{tag}]", our_loss, their_loss),
    ], differing


@dataclass
class SamplingResult:
    rows: list[Row]
    differing_ids: int
    total_ids: int
    first_differing_side: int | None
    mean_candidates: float  # tokens left per position by top-k / top-p on their logits, all scales


def compare_sampling(modules, reference, reference_vae, ours: FlexVAR, tokenizer, labels, *, sides, cfg: float,
                     top_k: int, top_p: float, max_pn: int, seed: int, decode: bool, tag: str) -> SamplingResult:
    """Their autoregressive_infer_cfg against our sample with the same seed: logits per scale, ids, images."""
    batch = labels.shape[0]
    reference.eval()
    ours.eval()
    their_logits, their_ids = [], []
    sampler = modules["flexvar"].sample_with_top_k_top_p_

    def recording_sampler(logits, *args, **kwargs):
        their_logits.append(logits.detach().clone())  # before their in-place top-k / top-p masking
        ids = sampler(logits, *args, **kwargs)
        their_ids.append(ids[:, :, 0].clone())
        return ids

    modules["flexvar"].sample_with_top_k_top_p_ = recording_sampler
    try:
        their_images = reference.autoregressive_infer_cfg(
            reference_vae, batch, labels, list(sides), g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p,
            more_smooth=False, max_pn=max_pn)
    finally:
        modules["flexvar"].sample_with_top_k_top_p_ = sampler
    our_logits = []
    with _recording(categorical_module, "filter_logits", our_logits, clone_arg=0):
        out = ours.sample(labels, tokenizer=tokenizer, var_cfg=cfg, top_k=top_k, top_p=top_p, scales=sides,
                          greedy_above=max_pn, generator=torch.Generator().manual_seed(seed))
    differing, first = 0, None
    for side, ours_k, theirs_k in zip(sides, out.indices, their_ids):
        diff = int((ours_k.flatten(1) != theirs_k).sum())
        differing += diff
        if diff and first is None:
            first = side
    per_scale = [compare(f"guided logits, side {s} [{tag}]", o, t) for s, o, t in zip(sides, our_logits, their_logits)]
    rows = [max(per_scale, key=lambda r: r.max_rel)]  # the worst scale
    if decode:
        rows.append(compare(f"decoded images [{tag}]", tokenizer.decode(out.codes), their_images))
    candidates = torch.cat([
        torch.isfinite(categorical_module.filter_logits(t, top_k=top_k, top_p=top_p)).sum(-1).flatten()
        for t in their_logits]).float().mean().item()
    return SamplingResult(rows, differing, batch * sum(s * s for s in sides), first, candidates)


# ---------------------------------------------------------------------------------------- report
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="checkout of jiaosiyu1999/FlexVAR")
    parser.add_argument("--depth", type=int, required=True, choices=DEPTHS)
    parser.add_argument("--small", action="store_true", help="two blocks of width 128 (the tokenizer stays full size)")
    parser.add_argument("--checkpoint", default=None, help="their FlexVARd{depth}-epo*.pth (default: random weights)")
    parser.add_argument("--vae-checkpoint", default=None, help="their FlexVAE.pth (default: random)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted max |diff| / max |theirs| (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding the sampled codes to images")
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
        torch.manual_seed(args.seed)
        reference_vae, reference = build_reference(modules, config)
    if changed:
        print(f"warning: reset_parameters of {', '.join(changed)} had been replaced; the originals are back")
    torch.set_grad_enabled(False)

    fresh = FlexVAR(config)  # our own init, to compare with theirs before their weights are replaced
    init_worst, init_odd = init_statistics(reference, fresh)
    del fresh
    if args.checkpoint:
        state = read_torch_state_dict(args.checkpoint, wrappers=(("trainer", "var_wo_ddp"),))
        state["attn_bias_for_masking"] = reference.state_dict()["attn_bias_for_masking"]  # as their scripts do
        reference.load_state_dict(state, strict=True)
    else:
        randomize_(reference, config, generator=torch.Generator().manual_seed(args.seed))
    if args.vae_checkpoint:
        reference_vae.load_state_dict(read_torch_state_dict(args.vae_checkpoint), strict=True)
    with tempfile.TemporaryDirectory() as folder:
        ours, dropped = ours_from_reference(reference, config, Path(folder))
    tokenizer = our_tokenizer(reference_vae)

    size = "small" if args.small else "full size"
    print(f"FlexVAR depth {args.depth} ({size}): width {config.width}, {config.depth} blocks, {config.num_heads} "
          f"heads; {sum(p.numel() for p in ours.parameters()):,} parameters (theirs "
          f"{sum(p.numel() for p in reference.parameters()):,})")
    print(f"init (before replacing their weights): worst |log(std ours / std theirs)| over tensors {init_worst:.3f}; "
          f"zero on one side only: {', '.join(init_odd) or 'none'}")
    print(f"weights: {args.checkpoint or 'random, full scale'} into ours via FlexVAR.from_released; dropped after "
          f"checks: {', '.join(dropped)}; tokenizer: {args.vae_checkpoint or 'their VQModel init'}\n")

    g = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=g)
    images = torch.rand(args.batch, 3, 256, 256, generator=g) * 2 - 1
    rows, failures, timings = [], [], []
    for name in TEACHER_FORCING_LISTS:
        start = time.perf_counter()
        found, differing = compare_teacher_forcing(modules, reference, reference_vae, ours, tokenizer, images, labels,
                                                   sides=SIDE_LISTS[name], tag=name, seed=args.seed)
        timings.append(f"teacher forcing [{name}] {time.perf_counter() - start:.1f} s")
        rows += found
        if differing:
            failures.append(f"target ids [{name}]")
    if not args.skip_sampling:
        for name in SAMPLING_LISTS:
            start = time.perf_counter()
            result = compare_sampling(modules, reference, reference_vae, ours, tokenizer, labels,
                                      sides=SIDE_LISTS[name], seed=args.seed + 1, decode=not args.no_decode,
                                      tag=name, **FID_SETTINGS)
            timings.append(f"sampling [{name}] {time.perf_counter() - start:.1f} s")
            rows += result.rows
            where = "" if result.first_differing_side is None else f" (first at side {result.first_differing_side})"
            print(f"sampled ids [{name}: {', '.join(f'{k} {v:g}' for k, v in FID_SETTINGS.items())}]: "
                  f"{result.differing_ids} of {result.total_ids} differ{where}; "
                  f"{result.mean_candidates:.1f} candidate tokens per draw on average")
            if result.differing_ids:
                failures.append(f"sampled ids [{name}]")
    print()
    print(format_table(rows, args.tolerance))
    print("\n" + "; ".join(timings))
    failed = [r.name for r in rows if not r.ok(args.tolerance)] + failures
    print("PARITY FAILED: " + ", ".join(failed) if failed else "parity: all within tolerance, all ids equal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
