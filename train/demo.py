"""The end-to-end demo on the bundled MNIST digits, on the CPU in about ten minutes:

    python -m train.demo --out runs/demo                                   # FlowAR
    python -m train.demo --out runs/demo-var --model var                   # the VAR baseline, same training budget
    python -m train.demo --out runs/demo-ms --model flowar-multistage      # FlowAR with E-CAR's multistage flow
    python -m train.demo --out runs/demo-fs --model flowar-fewstep         # FlowAR, its head distilled: 2 jumps per scale
    python -m train.demo --out runs/demo-fs --model flowar-fewstep --teacher runs/demo   # distil a FlowAR run's head
    python -m train.demo --out runs/demo-mf --model flowar-meanflow        # a flow-map head trained from scratch
    python -m train.demo --out runs/demo-fx --model flowar-flexible        # FlowAR on random scale lists
    python -m train.demo --out runs/demo-s1 --seed 1 --fid                 # another seed, and FID too

FlowAR:
1. train a small diffusers AutoencoderKL on the digits (32x32 -> 4x8x8 latents),
2. cache the VAE posteriors of the 4,500 training digits,
3. train a small class-conditional FlowAR on the cache (scales 1, 2, 4, 8), with TensorBoard logs,
4. export its weights with the VAE as a pipeline folder, and sample a 10x10 grid, one row per digit,
5. score 1,000 samples (100 per digit) with the digit classifier of ``eval.quality``: class-consistency.

VAR: the same, with VAR's multi-scale VQ tokenizer (scales 1, 2, 4, 8) instead of the VAE and a VAR
transformer trained with the same steps, batch and learning-rate schedule.

flowar-fewstep: the FlowAR demo (steps 1-4), then its head distilled into a flow-map head by
``train.distill_head`` (the transformer frozen, the head regressed onto the FlowAR's guided ODE solution), then
steps 4-5 with the student: 2 jumps per scale, unguided, 8 head evaluations per image against the FlowAR's 70.
``--teacher RUN`` distils the release of a FlowAR demo run already made (its seed, latent cache and VAE) instead
of training one. The distillation (600 steps) adds about 14 minutes to the FlowAR demo's 5 on a 2-core Xeon with AMX:
the few-step demo is no longer a ten-minute run; ``--distill steps=150 --distill ema=0`` takes 3.3 minutes for a
student that scored 0.2 (seed 0) to 2.2 (seed 2) classifier Frechet points worse (docs/ablations.md#distilled-few-step).

flowar-meanflow: the FlowAR demo with a flow-map head trained from scratch by the MeanFlow objective
(``heads.meanflow``), sampled with two jumps per scale.

flowar-flexible: the FlowAR demo with ``positions="grid"`` and ``scale_lists="random"``: every training step
draws its own list of scales from 1 to 8, so the release samples any list, e.g. ``--rescore RUN --sample
'scales=[1,2,3,4,6,8]' --sample steps=20``, and larger images with a last side above 8 (``'scales=[1,2,4,8,12]'``).
It trains for 800 steps by default, twice the others, and samples with guidance scale 1.5.

xar: xAR (``flowar.xar``) on the demo's VAE latents: four 4x4 cells, each a flow integrated by the transformer
itself with noisy context in training; the released SDE sampler with 10 evaluations per cell; 1200 steps by
default, its steps being cheaper than the FlowAR's.

flowar-multistage: the FlowAR demo with ``flow="multistage"`` (``heads.multistage``): each scale denoises
only its stage of time and fewer head steps are run at the late scales.

For ablations of the generator: ``--autoencoder DIR`` reuses the VAE (or tokenizer) folder of an earlier run
instead of training one, and ``--set KEY=VALUE`` (repeatable) overrides the training config, e.g.
``--set model.head_batch_mul=4``; the overrides are recorded in results.json. The VAE's own levers are
``--kl-weight`` (it trains a VAE) and ``--latent-norm per-channel`` (with ``--autoencoder`` it estimates the
reused VAE's latent statistics again into ``OUT/vae``: the weights do not depend on them, so no training is
needed). For ablations of the sampling,
``--rescore RUN`` scores the release of an earlier run again, exactly as step 5 scored it (same samples' seed,
same digit classifier), with ``--sample KEY=VALUE`` overriding its saved sampling options (repeatable; a
JSON value, e.g. ``--sample steps=20`` or ``--sample 'steps=[10,8,6,4]'``), and writes ``OUT/results.json``.
``--sample-seeds 1,10,11,12,13,14`` scores it at each of these samples' seeds instead of the run's own (its seed
+ 1) and writes each seed's scores and their mean and sd: one draw of 1,000 samples moves the Frechet distance
by 0.6 to 1.6 (sd) on the same release, so two releases compare best at the same several seeds, seed by seed.
``--sampling-precision bf16`` samples for the scores with the generator under bf16 autocast (the decoder stays
float32); on the three-seed demo runs it moved no score by more than 0.3 (docs/ablations.md#bf16-sampling).

Everything a run measures is also written to ``OUT/results.json`` (``python -m tools.demo_table``, in a clone
of the repository, puts seeds and models side by side). ``--seed`` seeds the autoencoder's and the model's
training and the sampling; ``--fid`` adds
the FID of the scored samples against the 4,500 training digits (the Inception network on a 2-core CPU:
about two minutes more per run, plus about eight the first time, while the reference's features are cached).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eval.machine import describe_cpu
from eval.quality import DigitScorer, sample_digits
from flowar import FlowARPipeline, load_pipeline
from flowar.cli import parse_step_counts
from flowar.outputs import PRECISIONS as SAMPLING_PRECISIONS, image_grid
from flowar.sampling import generate
from heads.multistage import stages_from_ends
from vae.files import atomic_write

from .cache_latents import cache_latents
from .config import load_config
from .data import MNISTDataset
from .export import export
from .latents import load_any_vae, load_tokenizer
from .train import train
from .train_tokenizer import train_tokenizer
from .distill_head import build_parser as build_distill_parser, check_arguments as check_distill_arguments, distill
from .train_vae import KL_WEIGHT, LATENT_NORMS, VAE_CHANNELS, check_kl_weight, parse_channels, renormalize_vae, \
    train_vae

# The recipe's choices and the measurements behind each one: docs/ablations.md#the-demos-recipe.
# A FlowAR small enough for a CPU: 2+2 blocks of width 128 and a 4-block transformer head. No dropout: in 400
# steps the model underfits (#dropout); logit-normal times put the head's training where the velocity is
# hardest to predict (#time-distribution); four head blocks beat two at every seed, and a wider head cost twice
# the time for worse scores (#head-depth). 20 Euler steps at the coarse scales and 10 at 8x8, where 3/4 of the
# tokens are, score as 20 everywhere at 1.3x the head work of 10 (#per-scale-steps).
DEMO_FLOWAR = {"num_classes": 10, "token_dim": 4, "scales": [1, 2, 4, 8], "width": 128, "num_heads": 4,
               "head_width": 128, "head_depth": 4, "attn_dropout": 0.0, "proj_dropout": 0.0,
               "time_distribution": "logit-normal", "sampling": {"guidance_scale": 2.0, "steps": [20, 20, 20, 10]}}
# The VAR baseline at about the same transformer size: 4 blocks of width 128 (var-tiny); scales, vocabulary
# and code size come from the tokenizer.
DEMO_VAR = {"num_classes": 10, "sampling": {"guidance_scale": 2.0}}
# The multistage FlowAR: the same model, each scale one stage. Stages end at noise levels 0.6, 0.4 and 0.25
# and the next starts as low as the jump allows (0.75, 0.57, 0.4); on these short spans the uniform grid,
# with fewer steps at the late scales. Its times stay uniform on each stage: logit-normal ones, which help the
# full flow, made it worse (docs/ablations.md#multistage-flow).
DEMO_MULTISTAGE = {**DEMO_FLOWAR, "flow": "multistage", "time_distribution": "uniform",
                   "stage_times": [list(span) for span in stages_from_ends([0.6, 0.4, 0.25])],
                   "sampling": {**DEMO_FLOWAR["sampling"], "steps": [8, 6, 5, 4], "schedule": "uniform"}}
# Equal compute: the VAE and the VQ tokenizer train for the same steps, as many as the tokenizer needs to use
# over half of its codebook at every scale.
AUTOENCODER_STEPS = 600
# The VAE's levers (--kl-weight, --latent-norm, --vae-channels) at train_vae's defaults: the demo's own VAE.
VAE_OPTIONS = {"kl_weight": KL_WEIGHT, "latent_norm": LATENT_NORMS[0], "channels": list(VAE_CHANNELS)}
# Both generators train with the same recipe: 400 steps of batch 64, lr 3e-3 (40 warm-up steps, cosine to
# 1e-4), and no weight averaging (ema 0: the release holds the trained weights), since at this length an EMA
# only lags the weights (docs/ablations.md#ema, #lr).
TRAINING = ["global_batch=64", "warmup_steps=40", "lr=3e-3", "min_lr=1e-4", "ema=0"]
# --precision auto trains the VAE and both generators under bf16 autocast (float32 master weights; the tokenizer
# stays float32) where the CPU computes bf16 natively, which keeps the demo near ten minutes; without AVX-512
# bf16 or AMX, torch emulates bf16 and gains nothing, so auto stays float32 there (docs/ablations.md#precision).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PRECISIONS = ("auto", "fp32", "bf16")
# The MeanFlow FlowAR: the same model with a flow-map head trained from scratch (objective "mean-flow", the
# paper's (r, t) law in place of the logit-normal times), sampled with 2 jumps per scale on the uniform grid.
DEMO_MEANFLOW = {**DEMO_FLOWAR, "flow_map": True, "objective": "mean-flow", "time_distribution": "uniform",
                 "sampling": {**DEMO_FLOWAR["sampling"], "solver": "flow-map", "steps": 2, "schedule": "uniform"}}
# The few-step FlowAR trains the FlowAR demo's model and then distils its head (train.distill_head).
# The flexible FlowAR: the same model with grid positions, trained on a random list of scales every step, so
# that it samples any list (--rescore RUN --sample 'scales=[1,4,8]' --sample steps=20) and larger images. Half
# the steps train the released list: at 400 steps FlexVAR's 5% left it far behind the fixed model there. The
# random lists share the training among many paths, so it trains twice as long (FLEXIBLE_STEPS), and it is
# guided more lightly: 1.5 had the lowest Frechet distance in a screen of 1.25 to 2 at seed 0, where the fixed
# model's 2.0 gave 26 against 16 (docs/ablations.md#flexible-scales).
DEMO_FLEXIBLE = {**DEMO_FLOWAR, "positions": "grid", "scale_lists": "random", "fixed_list_share": 0.5,
                 "sampling": {**DEMO_FLOWAR["sampling"], "guidance_scale": 1.5}}
DEMO_STEPS = 400
FLEXIBLE_STEPS = 800
XAR_STEPS = 1200
# xAR on the demo's 8x8x4 latents: four 4x4 cells; no head, so three blocks each side of width 128 stand in for
# the FlowAR's 2 + 2 blocks and 4-block head (about its parameter count). The released sampler: the SDE, 10
# transformer evaluations per cell, guidance ramped per cell. Its steps cost less than the FlowAR's (no head over
# the doubled token rows), and 400 of them left it far from the digits (class-consistency 46% at seed 0), so it
# trains XAR_STEPS.
DEMO_XAR = {"num_classes": 10, "token_dim": 4, "latent_side": 8, "cell_side": 4, "width": 128, "num_heads": 4,
            "encoder_depth": 3, "decoder_depth": 3, "attn_dropout": 0.0, "proj_dropout": 0.0,
            "sampling": {"guidance_scale": 2.0, "steps": 10}}
MODELS = {"flowar": DEMO_FLOWAR, "flowar-fewstep": DEMO_FLOWAR, "flowar-meanflow": DEMO_MEANFLOW,
          "flowar-multistage": DEMO_MULTISTAGE, "flowar-flexible": DEMO_FLEXIBLE, "var": DEMO_VAR,
          "xar": DEMO_XAR}


def generator_steps(model: str) -> int:
    """The training steps of ``--model``'s generator when ``--steps`` is not given."""
    return {"flowar-flexible": FLEXIBLE_STEPS, "xar": XAR_STEPS}.get(model, DEMO_STEPS)


def generator_family(model: str) -> tuple[str, str]:
    """(the name printed, the family whose "-tiny" preset ``--model``'s generator is built from)."""
    return {"var": ("VAR", "var"), "xar": ("xAR", "xar")}.get(model, ("FlowAR", "flowar"))

# The distillation (docs/ablations.md#distilled-few-step): 600 steps of batch 32 at a constant lr 1e-3 onto the
# teacher's own Euler solve on the uniform grid, 2 jumps per scale (1, 0.5, 0), the release the weights' average
# at decay 0.99. The student's gap to its targets about halves with each doubling of the steps from 150; lr 3e-3,
# a cosine rate, a midpoint, finer or coarser target solve, the released grid's targets, jumps on the "flowar" grid,
# conditions from sampled maps instead of the data, or other jumps at other scales were each level or worse.
DISTILL = {"steps": 600, "batch": 32, "lr": 1e-3, "lr_schedule": "constant", "ema": 0.99, "jumps_per_scale": "2",
           "teacher_solver": "euler",
           "teacher_steps": "20/20/20/10", "teacher_guidance": DEMO_FLOWAR["sampling"]["guidance_scale"],
           "teacher_schedule": "uniform", "prefix": "data", "random_pairs": 1, "precision": "fp32"}
# The sampling settings above are saved as each release's defaults and make the grid and the score: the linear
# guidance ramp at the scale with the lowest Frechet distance in a screen of 1.5 to 4 (docs/ablations.md#guidance).

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for every output")
    p.add_argument("--model", default="flowar", choices=tuple(MODELS))
    p.add_argument("--vae-steps", type=int, default=None,
                   help=f"VAE (FlowAR) or tokenizer (VAR) training steps (default {AUTOENCODER_STEPS} for both)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps of the generator (default {DEMO_STEPS}; {FLEXIBLE_STEPS} for flowar-flexible, "
                        f"{XAR_STEPS} for xar)")
    p.add_argument("--per-class", type=int, default=100, help="samples per digit for the score (0: no score)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the autoencoder's and the model's training and the samples (default 0; with "
                        "--rescore, the run's)")
    p.add_argument("--fid", action="store_true", help="also the FID of the scored samples against the training digits")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the VAE's and the generator's training: bf16 autocast or float32 (auto: bf16 where the "
                        "CPU has AVX-512 bf16 or AMX, else fp32)")
    p.add_argument("--autoencoder", default=None,
                   help="a VAE (FlowAR) or tokenizer (VAR) folder trained before, e.g. OUT/vae of another run, "
                        "used instead of training one (step 1): for ablations that change only the generator")
    p.add_argument("--kl-weight", type=float, default=None,
                   help=f"FlowAR's VAE: the KL weight against the reconstruction loss (default {KL_WEIGHT})")
    p.add_argument("--vae-channels", default=None, metavar="C1,C2,C3",
                   help="FlowAR's VAE: the encoder's channels at 32x32, 16x16 and 8x8, multiples of 16 (default "
                        f"{','.join(map(str, VAE_CHANNELS))})")
    p.add_argument("--latent-norm", choices=LATENT_NORMS, default=None,
                   help="FlowAR's VAE: one scaling factor for all latents (global, the default) or a mean and std "
                        "per channel; with --autoencoder, the reused VAE's statistics are estimated again")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training-config override as train.train takes it, e.g. model.head_batch_mul=4 or "
                        "lr=1e-3 (repeatable; applied after the demo's own settings)")
    p.add_argument("--teacher", default=None, metavar="RUN",
                   help="with --model flowar-fewstep: distil the release of this FlowAR demo output folder (its "
                        "seed, VAE and latent cache) instead of training a FlowAR first")
    p.add_argument("--distill", dest="distill_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --model flowar-fewstep: a distillation setting to override, among "
                        + ", ".join(DISTILL) + " (repeatable), e.g. steps=600")
    p.add_argument("--rescore", default=None, metavar="RUN",
                   help="score the release of an earlier demo output folder again (step 5 only), with --sample")
    p.add_argument("--sample-seeds", default=None, metavar="S1,S2,...",
                   help="with --rescore: score at each of these samples' seeds (the run's own is its seed + 1) and "
                        "write their mean and sd")
    p.add_argument("--sample", dest="sampling", action="append", default=[], metavar="KEY=VALUE",
                   help="with --rescore: a sampling option of the release to override, e.g. steps=20 or "
                        "solver=midpoint (repeatable; the value is read as JSON, else as a string)")
    p.add_argument("--sampling-precision", choices=tuple(SAMPLING_PRECISIONS), default="fp32",
                   help="with --rescore: sample in float32, or with the generator under bf16 autocast (the decoder "
                        "stays float32), as tools.demo_table --time then times the row")
    args = p.parse_args(argv)
    if args.sample_seeds is not None:
        args.sample_seeds = parse_sample_seeds(p, args.sample_seeds)
    if args.rescore is not None:
        return rescore(p, args)
    if args.sample_seeds is not None:
        p.error("--sample-seeds needs --rescore RUN: a full run scores at its own seed + 1")
    if args.sampling:
        p.error("--sample needs --rescore RUN: a full run scores with the release's saved sampling options; "
                "score its output folder again with --rescore OUT --sample KEY=VALUE")
    if args.sampling_precision != "fp32":
        p.error("--sampling-precision needs --rescore RUN: a full run scores in float32; score its output folder "
                "again with --rescore OUT --sampling-precision bf16")
    teacher_run = None
    if args.teacher is not None:
        teacher_run = check_teacher_run(p, args)
    distill_settings = parse_distill(p, args)
    if args.seed is None:
        args.seed = 0
    if args.steps is None:
        args.steps = generator_steps(args.model)
    if args.fid and not args.per_class:
        p.error("--fid needs samples to score: --per-class must be >= 1")
    if args.autoencoder is not None and args.vae_steps is not None:
        p.error("--vae-steps trains an autoencoder and --autoencoder reuses one: give one of them")
    if args.model == "var" and (args.kl_weight is not None or args.latent_norm is not None
                                or args.vae_channels is not None):
        p.error("--kl-weight, --vae-channels and --latent-norm are options of FlowAR's VAE; VAR's tokenizer "
                "has none of them")
    if args.autoencoder is not None and (args.kl_weight is not None or args.vae_channels is not None):
        p.error("--kl-weight and --vae-channels train a VAE and --autoencoder reuses one: give one of them")
    if args.vae_channels is not None:
        try:
            args.vae_channels = parse_channels(args.vae_channels, name="--vae-channels")
        except ValueError as err:
            p.error(str(err))
    if args.kl_weight is not None:
        try:
            check_kl_weight(args.kl_weight, name="--kl-weight")
        except ValueError as err:
            p.error(str(err))
    if args.autoencoder is not None and args.latent_norm is not None and \
            Path(args.autoencoder).resolve() == (Path(args.out) / "vae").resolve():
        p.error("--latent-norm with --autoencoder writes OUT/vae: give an --out other than the reused VAE's run")
    if args.autoencoder is not None and not (Path(args.autoencoder) / "config.json").is_file():
        p.error(f"--autoencoder {args.autoencoder}: not a VAE or tokenizer folder (no config.json there)")
    for override in args.overrides:
        if "=" not in override:
            p.error(f"--set takes KEY=VALUE, got {override!r}")
    out = Path(args.out)
    start = time.perf_counter()
    var = args.model == "var"
    fewstep = args.model == "flowar-fewstep"
    results = {"model": args.model, "seed": args.seed, "steps": args.steps, **describe_cpu()}
    stages = Stages(5 + fewstep)
    if teacher_run is not None:
        release, cache_dir, encoder_dir, run_dir = reuse_teacher(teacher_run, results, stages)
    else:
        release, cache_dir, encoder_dir, run_dir = train_generator(args, out, results, stages)
    if fewstep:
        d = distill_settings
        stages.next(f"distilling the head into a flow-map head ({d['steps']} steps of batch {d['batch']}, lr "
                    f"{d['lr']:g}, {d['jumps_per_scale']} jumps per scale)")
        began = time.perf_counter()
        release = distill(build_distill_parser().parse_args(distill_argv(release, cache_dir, out / "distill",
                                                                          args.seed, d)))
        results.update(distill_minutes=(time.perf_counter() - began) / 60, distill=d,
                       distill_overrides=list(args.distill_overrides), teacher=str(teacher_run or out / "flowar-release"))
        run_dir = out / "distill"

    stages.next(f"sampling a 10x10 grid from the release {release}")
    pipe = load_pipeline(release)
    labels = [digit for digit in range(10) for _ in range(10)]
    images = pipe(labels, output_type="np", generator=torch.Generator().manual_seed(args.seed))
    grid_path = out / "grid.png"
    image_grid(images, nrow=10).save(grid_path)
    results.update(sampling_cost(pipe), release=str(release))

    report = None
    if args.per_class:
        stages.next(f"scoring {10 * args.per_class} samples with the digit classifier")
        report = score(pipe, results, classifier_dir=out / "digit-classifier", per_class=args.per_class,
                       seed=args.seed + 1, fid=args.fid)
    results["minutes"] = (time.perf_counter() - start) / 60
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))

    print(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min. Outputs:")
    print(f"  {'tokenizer' if var else 'VAE'} (folder)".ljust(32) + str(encoder_dir))
    print(f"  {'token' if var else 'latent'} cache".ljust(32) + str(cache_dir))
    print("  training run + checkpoints".ljust(32) + str(run_dir))
    print("  TensorBoard logs".ljust(32) + f"{run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir})")
    print(f"  release folder (model + {'tokenizer' if var else 'VAE'})".ljust(32) + str(release))
    print("  sample grid, row = digit".ljust(32) + str(grid_path))
    print("  measured results".ljust(32) + str(out / "results.json"))
    if report is not None:
        print("  digit classifier".ljust(32) + str(out / "digit-classifier"))
        print("  class-consistency".ljust(32) + f"{report.class_consistency:.1%}")
    return 0


class Stages:
    """The demo's numbered progress lines: [i/n] text."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def next(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}")


def train_generator(args, out: Path, results: dict, stages: Stages) -> tuple[Path, Path, Path, Path]:
    """Steps 1-3 and the export: the autoencoder, the cache, the generator's training, its release folder.
    Returns (release, cache folder, autoencoder folder, training run folder); fills ``results``."""
    var = args.model == "var"
    precision = training_precision(args.precision, results["cpu_flags"])
    results["precision"] = precision

    steps = args.vae_steps or AUTOENCODER_STEPS
    vae_options = {**VAE_OPTIONS, **({"kl_weight": args.kl_weight} if args.kl_weight is not None else {}),
                   **({"latent_norm": args.latent_norm} if args.latent_norm else {}),
                   **({"channels": args.vae_channels} if args.vae_channels is not None else {})}
    renormalize = args.autoencoder is not None and args.latent_norm is not None
    encoder_dir = Path(args.autoencoder) if args.autoencoder and not renormalize \
        else out / ("tokenizer" if var else "vae")
    if args.autoencoder:
        stages.next(f"reusing the {'tokenizer' if var else 'VAE'} in {args.autoencoder}")
        summary_file = Path(args.autoencoder) / "demo_autoencoder.json"
        result = json.loads(summary_file.read_text()) if summary_file.exists() else {"psnr": float("nan"), "steps": None}
        steps = result.get("steps")
        if not var:  # a VAE's own summary says how it was trained (None: a folder the demo did not train)
            vae_options = {key: result.get(key) for key in VAE_OPTIONS}
        if renormalize:
            print(f"      its latents normalised {args.latent_norm}, saved to {encoder_dir}")
            result = {**result, **renormalize_vae(args.autoencoder, encoder_dir, latent_norm=args.latent_norm,
                                                  seed=result.get("seed", args.seed))}
            vae_options["latent_norm"] = args.latent_norm
    elif var:
        stages.next(f"training the MNIST multi-scale VQ tokenizer ({steps} steps)")
        result = train_tokenizer(encoder_dir, steps=steps, seed=args.seed)
        usage = " ".join(f"{s}x{s}:{u:.0%}" for s, u in zip(result["scales"], result["usage"]))
        print(f"      held-out reconstruction PSNR {result['psnr']:.2f} dB, codebook use per scale {usage}")
    else:
        stages.next(f"training the MNIST VAE ({steps} steps, channels {vae_options['channels']}, {precision})")
        result = train_vae(encoder_dir, steps=steps, seed=args.seed, bf16=precision == "bf16", **vae_options)
        print(f"      held-out reconstruction PSNR {result['psnr']:.2f} dB, scaling factor {result['scaling_factor']:.3f}")
    if not args.autoencoder or renormalize:  # what a later --autoencoder run reports about it
        summary = {"steps": steps, "psnr": float(result["psnr"]), "seed": result.get("seed", args.seed),
                   **({"usage": list(result["usage"])} if var else vae_options)}
        atomic_write(encoder_dir / "demo_autoencoder.json", lambda tmp: tmp.write_text(json.dumps(summary)))
    encoder = load_tokenizer(str(encoder_dir)) if var else load_any_vae(str(encoder_dir))
    if var and "usage" in result:
        results["codebook_use"] = list(result["usage"])
    results.update(autoencoder_steps=steps, psnr=float(result["psnr"]))
    if not var:  # a row of tools.demo_table per VAE that differs from the demo's
        results["autoencoder_overrides"] = [
            f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
            for key, value in vae_options.items() if value != VAE_OPTIONS[key]]

    stages.next("caching the " + ("token maps" if var else "VAE latents") + " of the training digits")
    cache_dir = cache_latents(MNISTDataset(image_size=32, split="train"), encoder, out / ("tokens" if var else "latents"),
                              vae_path=str(encoder_dir), data_source="mnist")

    name, family = generator_family(args.model)
    stages.next(f"training {name} ({args.steps} steps, {precision})")
    model = dict(MODELS[args.model])
    if var:  # the transformer's vocabulary and inputs are the tokenizer's
        model = {**model, "scales": list(encoder.scales), "vocab_size": encoder.codebook_size,
                 "code_dim": encoder.code_dim}
    cfg = load_config(None, [
        f"latent_cache={cache_dir}", f"out_dir={out / args.model}", f"preset={family}-tiny",
        *TRAINING, f"bf16={str(precision == 'bf16').lower()}", f"total_steps={args.steps}", "checkpoint_every=100",
        f"sample_every={max(args.steps // 4, 1)}", "log_every=10", f"seed={args.seed}",
        *(f"model.{k}={json.dumps(v)}" for k, v in model.items()), *args.overrides,
    ])
    results["overrides"] = list(args.overrides)
    run_dir = train(cfg)

    release = export(run_dir, out / f"{'flowar' if args.model == 'flowar-fewstep' else args.model}-release")
    return release, cache_dir, encoder_dir, run_dir


def parse_distill(p: argparse.ArgumentParser, args) -> dict:
    """DISTILL updated by ``--distill KEY=VALUE`` items (flowar-fewstep only), each value of its setting's type."""
    if args.distill_overrides and args.model != "flowar-fewstep":
        p.error("--distill sets the distillation of --model flowar-fewstep")
    settings = dict(DISTILL)
    for item in args.distill_overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in DISTILL:
            p.error(f"--distill takes KEY=VALUE with KEY among {', '.join(DISTILL)}, got {item!r}")
        try:
            settings[key] = type(DISTILL[key])(value)
        except ValueError:
            p.error(f"--distill {key} takes a{'n integer' if isinstance(DISTILL[key], int) else ' number'}, got {value!r}")
    # The distillation's own parser and checks, now rather than after the FlowAR demo has trained.
    parser = build_distill_parser()
    parser.exit_on_error = False
    try:
        check_distill_arguments(parser.parse_args(distill_argv("TEACHER", "CACHE", "OUT", 0, settings)))
    except (argparse.ArgumentError, ValueError) as err:
        p.error(f"--distill: {err}")
    jumps = parse_step_counts(settings["jumps_per_scale"])
    if isinstance(jumps, tuple) and len(jumps) != len(DEMO_FLOWAR["scales"]):
        p.error(f"--distill jumps_per_scale takes one count or one per scale of {DEMO_FLOWAR['scales']}, "
                f"got {settings['jumps_per_scale']!r}")
    return settings


def distill_argv(teacher, cache_dir, out, seed: int, settings: dict) -> list[str]:
    """``train.distill_head``'s command line for the demo's distillation ``settings`` (every one explicit), with 4
    sample grids and one checkpoint at the end."""
    return [str(teacher), "--latent-cache", str(cache_dir), "--out", str(out), "--seed", str(seed),
            *(f"--{key.replace('_', '-')}={value}" for key, value in settings.items()),
            "--sample-every", str(max(settings["steps"] // 4, 1)), "--checkpoint-every", str(settings["steps"])]


def check_teacher_run(p: argparse.ArgumentParser, args) -> Path:
    """``--teacher RUN``: a finished FlowAR demo folder, for --model flowar-fewstep, with none of the options that
    would train a FlowAR or an autoencoder; sets ``args.seed`` to the run's."""
    if args.model != "flowar-fewstep":
        p.error("--teacher distils a FlowAR demo run's head: it needs --model flowar-fewstep")
    if args.autoencoder is not None or args.overrides or args.vae_steps is not None or args.kl_weight is not None \
            or args.vae_channels is not None or args.latent_norm is not None or args.precision != "auto":
        p.error("--teacher reuses the run's VAE and FlowAR: --autoencoder, --set, --vae-steps, --kl-weight, "
                "--vae-channels, --latent-norm and --precision do not apply")
    run = Path(args.teacher)
    summary = run / "results.json"
    if not summary.is_file():
        p.error(f"--teacher {run}: not a demo output folder (no results.json there)")
    previous = json.loads(summary.read_text())
    if previous.get("model") != "flowar":
        p.error(f"--teacher {run}: a run of --model {previous.get('model')}; the teacher must be a --model flowar run")
    if args.seed is not None and args.seed != previous["seed"]:
        p.error(f"--seed {args.seed}: the teacher run {run} was made with seed {previous['seed']}; omit --seed")
    args.seed = previous["seed"]
    release = run_release(run, previous)
    if not (release / "config.json").is_file():
        p.error(f"--teacher {run}: its release folder is missing ({release})")
    if not (run / "latents").is_dir():
        p.error(f"--teacher {run}: its latent cache is missing ({run / 'latents'})")
    return run


def run_release(run: Path, previous: dict) -> Path:
    """A demo run's release folder: where its results.json says, or where the demo puts it if the run folder
    was moved."""
    release = Path(previous.get("release", ""))
    if (release / "config.json").is_file():
        return release
    return run / "distill" / "release" if previous["model"] == "flowar-fewstep" else run / f"{previous['model']}-release"


def reuse_teacher(run: Path, results: dict, stages: Stages) -> tuple[Path, Path, Path, Path]:
    """Steps 1-3 and the export, taken from the FlowAR demo run ``run``: what train_generator returns."""
    previous = json.loads((run / "results.json").read_text())
    stages.done = 3  # the autoencoder, the cache and the FlowAR are the run's
    print(f"[1-3/{stages.total}] reusing the VAE, latent cache and FlowAR release of {run}")
    results.update({key: previous[key] for key in ("precision", "autoencoder_steps", "psnr", "autoencoder_overrides",
                                                     "overrides", "steps") if key in previous})
    # What the teacher's demo took without its FID: with the distillation, the few-step demo's whole time.
    results["teacher_minutes"] = previous["minutes"] - previous.get("fid_minutes", 0.0)
    release = run_release(run, previous)
    return release, run / "latents", release / FlowARPipeline.autoencoder_folder, run / "flowar"


def training_precision(choice: str, cpu_flags: list[str]) -> str:
    """``--precision``: fp32 or bf16, auto resolved by the CPU's flags (see NATIVE_BF16_FLAGS)."""
    if choice == "auto":
        return "bf16" if any(flag in cpu_flags for flag in NATIVE_BF16_FLAGS) else "fp32"
    return choice


# What score() writes into a results dict; a rescored run drops the run's own values of them (and its minutes).
SCORE_KEYS = ("sampling_ms_per_image", "num_samples", "class_consistency", "per_digit", "frechet_distance",
              "real_heldout_frechet", "fid", "fid_minutes")


def score(pipe, results: dict, *, classifier_dir: Path, per_class: int, seed: int, fid: bool,
          autocast_dtype: torch.dtype | None = None, **sampling):
    """Step 5: ``per_class`` samples of each digit drawn with seed ``seed`` (a run's own: its seed + 1, the grid
    having used its seed) at the
    release's sampling options updated by ``sampling``, the generator under ``autocast_dtype`` if given, scored by the digit classifier in ``classifier_dir``
    (the machine's shared classifier is copied there if absent) and, with ``fid``, against the training digits;
    the scores go into ``results``."""
    scorer = DigitScorer.load_or_train(classifier_dir, progress=False)
    began = time.perf_counter()
    images, labels = sample_digits(pipe, per_class=per_class, seed=seed, autocast_dtype=autocast_dtype, **sampling)
    results["sampling_ms_per_image"] = 1000 * (time.perf_counter() - began) / len(labels)
    report = scorer.score(images, labels)
    print("      " + report.summary())
    results.update(num_samples=report.num_samples, class_consistency=report.class_consistency,
                   per_digit=report.per_digit, frechet_distance=report.frechet_distance,
                   real_heldout_frechet=report.real_heldout_frechet)
    if fid:
        began = time.perf_counter()
        results["fid"] = training_digits_fid(images)
        results["fid_minutes"] = (time.perf_counter() - began) / 60  # the demo's own time is minutes less this
        print(f"      FID against the 4,500 training digits {results['fid']:.2f}")
    return report


def sampling_options(items: list[str]) -> dict:
    """``--sample KEY=VALUE`` items (as given, or as a rescored run's results.json records them) as keyword
    options; each value is JSON where it parses, else a string. A malformed item is a ValueError."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--sample takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def parse_sampling(p: argparse.ArgumentParser, items: list[str]) -> dict:
    """:func:`sampling_options` of the command line, a malformed item exiting with the parser's error."""
    try:
        return sampling_options(items)
    except ValueError as err:
        p.error(str(err))


def parse_sample_seeds(p: argparse.ArgumentParser, text: str) -> list[int]:
    """``--sample-seeds``: distinct integers >= 0, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        p.error(f"--sample-seeds takes comma-separated integers such as 1,10,11, got {text!r}")
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        p.error(f"--sample-seeds takes distinct integers >= 0, got {text!r}")
    return seeds


def rescore(p: argparse.ArgumentParser, args) -> int:
    """``--rescore RUN``: step 5 again on RUN's release, with ``--sample`` overrides; RUN is left untouched."""
    run = Path(args.rescore)
    if not (run / "results.json").is_file():
        p.error(f"--rescore {run}: not a demo output folder (no results.json there)")
    if args.seed is not None or args.autoencoder is not None or args.overrides or args.vae_steps is not None \
            or args.precision != "auto":
        p.error("--rescore takes the run's seed, autoencoder and training: --seed, --autoencoder, --set, "
                "--vae-steps and --precision do not apply")
    if not args.per_class:
        p.error("--rescore needs samples to score: --per-class must be >= 1")
    out = Path(args.out)
    if out.resolve() == run.resolve():
        p.error(f"--out {out}: give a new folder; --rescore does not overwrite the run's results")
    previous = json.loads((run / "results.json").read_text())
    release = run_release(run, previous)
    if not (release / "config.json").is_file():
        p.error(f"--rescore {run}: its release folder is missing ({release})")
    sampling = parse_sampling(p, args.sampling)
    pipe = load_pipeline(release)
    try:
        pipe.model.sampling_options(None, **sampling)
    except (TypeError, ValueError) as err:
        p.error(f"--sample: {err}")
    start = time.perf_counter()
    results = {key: value for key, value in previous.items() if key not in (*SCORE_KEYS, "minutes")}
    results.update(**describe_cpu(), **sampling_cost(pipe, **sampling), release=str(release), rescored_from=str(run),
                   sampling_overrides=list(args.sampling), sampling_precision=args.sampling_precision)
    autocast_dtype = SAMPLING_PRECISIONS[args.sampling_precision]
    classifier = run / "digit-classifier" if (run / "digit-classifier" / "config.json").is_file() \
        else out / "digit-classifier"
    seeds = args.sample_seeds or [previous["seed"] + 1]
    print(f"rescoring {release} with {sampling or 'its saved sampling options'} in {args.sampling_precision}: "
          f"{10 * args.per_class} samples at each of the samples' seeds {seeds}, the digit classifier in {classifier}")
    if args.sample_seeds is None:
        score(pipe, results, classifier_dir=classifier, per_class=args.per_class, seed=seeds[0], fid=args.fid,
              autocast_dtype=autocast_dtype, **sampling)
    else:
        by_seed = []
        for seed in seeds:
            scored = {}
            score(pipe, scored, classifier_dir=classifier, per_class=args.per_class, seed=seed, fid=args.fid,
                  autocast_dtype=autocast_dtype, **sampling)
            by_seed.append({"sample_seed": seed, **scored})
        results.update(seed_summary(by_seed), by_sample_seed=by_seed)
    results["rescore_minutes"] = (time.perf_counter() - start) / 60
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    print(f"done in {results['rescore_minutes']:.1f} min: {out / 'results.json'}")
    return 0


# What --sample-seeds averages over its seeds (with an sd each) into a rescored run's results.
SEED_AVERAGED = ("class_consistency", "frechet_distance", "real_heldout_frechet", "fid")


def seed_summary(by_seed: list[dict]) -> dict:
    """The mean of each of SEED_AVERAGED over the scores of several samples' seeds (``name``) and its sd
    (``name_sd``, n - 1 in the denominator); the samples' count and sampling time of the first."""
    summary = {key: by_seed[0][key] for key in ("num_samples", "sampling_ms_per_image")}
    for key in SEED_AVERAGED:
        if key in by_seed[0]:
            values = torch.tensor([scores[key] for scores in by_seed], dtype=torch.float64)
            summary[key] = values.mean().item()
            summary[f"{key}_sd"] = values.std().item() if len(values) > 1 else 0.0
    return summary


def sampling_cost(pipe, **sampling) -> dict:
    """Per image, at the release's saved sampling settings updated by ``sampling``: transformer passes, head
    evaluations (FlowAR's ODE steps summed over scales; 0 for VAR, whose head is a linear layer inside each
    pass) and head token rows (rows through the head, doubled where guided: the head's FLOPs are proportional
    to them)."""
    model = pipe.model
    out = generate(model, list(range(10)), autoencoder=pipe.autoencoder, generator=torch.Generator().manual_seed(0),
                   **sampling)
    return {"transformer_passes": len(model.config.scales), "head_evaluations": int(getattr(out, "nfe", 0)),
            "head_rows_per_image": getattr(out, "head_rows", 0) / 10}


def training_digits_fid(images) -> float:
    """FID of uint8 digit images against the 4,500 training digits, with the default Inception network; the
    reference's features are cached in eval.reference's default cache folder."""
    from eval.fid import compute_metrics
    from eval.quality import training_digits_reference
    from eval.reference import default_cache_dir

    reference = training_digits_reference()
    return float(compute_metrics(images, str(reference), cache_dir=default_cache_dir(), progress=False)["fid"])


if __name__ == "__main__":
    raise SystemExit(main())
