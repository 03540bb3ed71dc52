"""Distil a trained FlowAR's head into a flow-map head that jumps each scale in K evaluations.

    python -m train.distill_head TEACHER --latent-cache DIR --out OUT [--steps N] [--batch B] [--lr LR]
        [--seed S] [--jumps-per-scale K or K1/K2/...] [--precision {fp32,bf16}] [--checkpoint-every N] [--sample-every N]
        [--resume]
    torchrun --nproc_per_node=2 -m train.distill_head TEACHER ...     # DDP (gloo on CPU, nccl on GPU)

TEACHER is a FlowAR pipeline folder (its ``vae/`` beside the model) or a bare model folder. The student is the
teacher's model with ``flow_map=True``: the teacher's transformer, frozen, and a head that starts as the teacher's
(``load_velocity_state``: its average velocity is the teacher's velocity, so one jump is one Euler step).

Objective: flow-map matching against the teacher's own trajectories. Each step takes a batch of cached latents,
conditions every scale on them by teacher forcing (the class's conditions and the null class's; ``--prefix``
conditions each scale on what the teacher's or the student's sampling drew at the scales before it instead),
solves the teacher's guided ODE from fresh noise on its grid and records every grid state. The student then regresses
its average velocity u(x_{t_i}, r = t_j, t_i) onto the chord (x_{t_i} - x_{t_j}) / (t_i - t_j) for the K jumps
sampling will take (the uniform jump grid) and for one random pair t_i > t_j of the teacher's grid per image.
K may differ between scales (``--jumps-per-scale 1/2/2/2``): a student trained for one jump at the single-token
1x1 scale scored level with one trained for two there (docs/ablations.md#jumps-per-scale).
A direct regression needs no jvp (unlike the MeanFlow identity), and its minimiser is the teacher's solution
itself, so at convergence the trained jumps land exactly where the teacher's solve does; the random pairs teach
the other intervals, so a student sampled with another jump count still has something learnt to say.

The targets are the teacher's GUIDED solution (its saved guidance weight per scale, schedule and interval), so
the student samples unguided (``guidance_scale=1``): guidance costs nothing at sampling time. Its saved sampling
defaults are the "flow-map" solver with K jumps per scale (each scale's own K) on the uniform grid.

The teacher's grid (``--teacher-schedule``) is uniform, with its saved step count rounded up to a multiple of K
(25 for an adaptive solver), or the released "flowar" grid of that count with the jump times inserted; either way
every jump ends on a grid point and no target is interpolated (interpolating between states would add an error of
its own to every target). The target solver (Euler, midpoint, rk4, dopri5) steps from grid point to grid point.

Precision: ``--precision bf16`` runs the teacher's solve and the student's forward and backward under bf16
autocast, as ``train.train --set bf16=true`` trains (the states and the loss stay float32 or wider). On CPUs with AMX
or AVX-512 bf16 it makes a step about twice as fast, for targets within about 2% of the float32 solve.

Reproducibility: every random draw of a step (the batch, posterior noise and flips, ODE noise, the random pairs)
is drawn for the whole batch from one generator seeded by (seed, step), and each process takes its rows of it, so
a resumed run equals an uninterrupted one and the draws do not depend on the number of processes. Under torchrun
each process solves the teacher for its rows and the head's gradients are averaged over processes.

Outputs (rank 0): checkpoints (the student head, its average, the optimiser, the step) to OUT atomically
every ``--checkpoint-every`` steps and at the end; TensorBoard scalars and, every ``--sample-every`` steps, a
grid of the student's samples (``train.train.SampleGrid``: one row per class, the same noise every time; the
teacher's guided samples from that noise are logged once, beside the first) to OUT/tensorboard; the student
release (the averaged head with ``--ema``) to OUT/release.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from flowar import FlowAR, FlowARPipeline, FlowARSampling
from flowar.cli import parse_step_counts
from flowar.attention import scale_segments
from flowar.model import from_tokens
from flowar.outputs import autocast_context
from heads.flow import HeadVelocity
from heads.solvers import ADAPTIVE_SOLVERS, JUMP_SOLVERS, SCHEDULES, SOLVERS, SolveOptions, integrate, step_schedule
from vae.files import read_class_names, read_model_type, write_class_names
from vae.pyramid import area_pyramid

from .checkpoint import CheckpointManager
from .latents import CachedLatents
from .train import SampleGrid, ema_decay, setup_distributed, step_generator, update_ema

ADAPTIVE_TEACHER_STEPS = 25  # the teacher grid of an adaptive (dopri5) teacher, which saves no step count
ODE_SOLVERS = tuple(s for s in SOLVERS if s not in JUMP_SOLVERS)  # what can solve an ordinary head's ODE
# What conditions each scale of a training step: the cached latents' pyramid (teacher forcing, as in training),
# or the maps the teacher's target solves (as its sampling sees them) or the student's own jumps (as the
# student's sampling sees them) drew at the scales before it.
PREFIXES = ("data", "teacher", "student")
LR_SCHEDULES = ("constant", "cosine")  # cosine: half a cosine from --lr down to 0 at --steps
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # --precision: the autocast dtype of a step


# ---------------------------------------------------------------------------------------------- models
def load_teacher(path) -> tuple[FlowAR, object | None]:
    """(the teacher FlowAR, its pipeline's VAE or None for a bare model folder), in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"TEACHER must be a FlowAR pipeline or model folder, got {path}")
    kind = read_model_type(folder)
    if kind != FlowAR.model_type:
        raise ValueError(f"TEACHER {path} holds a {kind!r} model; distillation needs a {FlowAR.model_type!r} one")
    if (folder / FlowARPipeline.autoencoder_folder).is_dir():
        pipe = FlowARPipeline.from_pretrained(folder)
        teacher, vae = pipe.model, pipe.vae
    else:
        teacher, vae = FlowAR.from_pretrained(folder), None
    c = teacher.config
    if c.flow_map:
        raise ValueError(f"TEACHER {path} has a flow-map head already (flow_map=True); distil an ordinary head")
    if c.flow != "full":
        raise ValueError(f"TEACHER {path} has flow={c.flow!r}; distillation supports flow='full' only")
    teacher.requires_grad_(False)
    return teacher.eval(), vae


def jumps_at(jumps: int | tuple[int, ...], k: int) -> int:
    """Scale k's jump count of ``jumps``: one count for every scale, or a tuple of one per scale."""
    return jumps[k] if isinstance(jumps, tuple) else jumps


def build_student(teacher: FlowAR, jumps: int | tuple[int, ...], *, seed: int = 0) -> FlowAR:
    """The teacher's model with a flow-map head: every weight copied, only the head trainable, and sampling
    defaults of ``jumps`` uniform flow-map jumps per scale (one count, or one per scale), unguided (the head learns
    the guided solution).

    The interval embedding's first layer keeps its random init (only its output is zeroed), so it is drawn from
    ``seed``: two runs with one seed start from one student, whatever the global generator holds."""
    c = teacher.config
    if isinstance(jumps, tuple) and len(jumps) != len(c.scales):
        raise ValueError(f"--jumps-per-scale holds {len(jumps)} counts but the teacher has {len(c.scales)} scales "
                         f"{tuple(c.scales)}: give one count, or one per scale")
    sampling = c.sampling.replace(solver="flow-map", steps=jumps, schedule="uniform", guidance_scale=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = FlowAR(dataclasses.replace(c, flow_map=True, sampling=sampling))
    state = teacher.state_dict()
    rest = {k: v for k, v in state.items() if not k.startswith("flownet.")}
    student.load_state_dict(rest, strict=False)
    student.flownet.load_velocity_state({k[len("flownet."):]: v for k, v in state.items() if k.startswith("flownet.")})
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("flownet."))
    return student.eval()  # no dropout: the frozen transformer conditions exactly as the teacher's


# ---------------------------------------------------------------------------------------------- targets
def target_sampling(teacher: FlowAR, *, solver: str | None = None, steps=None,
                    guidance_scale: float | None = None) -> FlowARSampling:
    """The teacher's saved sampling with its solver, step counts and guidance scale replaced where given
    (``--teacher-solver``, ``--teacher-steps``, ``--teacher-guidance``): the solve whose states are the targets.
    The student learns that guided solution, so its guidance is the student's too (it samples unguided)."""
    given = {key: value for key, value in (("solver", solver), ("steps", steps), ("guidance_scale", guidance_scale))
             if value is not None}
    if given.get("solver") in ADAPTIVE_SOLVERS:
        given["steps"] = None
    try:
        return teacher.sampling_options(None, **given)  # checked against the teacher (one count per scale)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--teacher-solver / --teacher-steps / --teacher-guidance: {err}") from None


def teacher_grid(sampling: FlowARSampling, k: int, jumps: int, schedule: str = "uniform"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale k's teacher grid (float64, from 1 down to 0) and the indices in it of the uniform jump grid's
    ``jumps + 1`` times, which sampling jumps between.

    "uniform": the target solve's step count rounded up to a multiple of ``jumps``, evenly spaced, so the jump
    times are grid points. "flowar": the released sampler's grid of that step count (``step_schedule``), with the
    jump times it lacks inserted, so the targets are the teacher's own solve, split where a jump ends."""
    steps = sampling.steps_at(k) or ADAPTIVE_TEACHER_STEPS
    if schedule == "uniform":
        steps = math.ceil(steps / jumps) * jumps
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64), torch.arange(jumps + 1) * (steps // jumps)
    jump_times = torch.linspace(1, 0, jumps + 1, dtype=torch.float64)
    grid = torch.cat([step_schedule(steps, schedule), jump_times]).unique().flip(0)
    # Both run from 1 down to 0, so the grid points equal to a jump time come in the jump grid's order.
    return grid, (grid[:, None] == jump_times[None]).nonzero()[:, 0]


@torch.no_grad()
def teacher_conditions(teacher: FlowAR, pyramid: list[torch.Tensor], labels: torch.Tensor | None, *, guided: bool
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-scale head conditions (B, s*s, D) of the class and, when ``guided``, of the null class (else None),
    from ``pyramid``, each scale's map (B, C, s, s), fed as in training but without label drop or context noise.
    Scale k's conditions depend on the maps of the scales before it only (the attention is block-causal)."""
    c = teacher.config
    if c.unconditional:
        labels = torch.full((pyramid[0].shape[0],), teacher.null_class, device=pyramid[0].device)
    inputs = teacher.z_proj(teacher.input_tokens(pyramid))
    guided = guided and not c.unconditional

    def run(class_ids):
        class_embedding = teacher.class_emb(class_ids)
        z = teacher.transformer(torch.cat([class_embedding[:, None], inputs], dim=1), class_embedding)
        return [z[:, start:end] for start, end in scale_segments(c.scales)]

    cond = run(labels)
    null = run(torch.full_like(labels, teacher.null_class)) if guided else None
    return cond, null


@torch.no_grad()
def teacher_trajectory(teacher: FlowAR, sampling: FlowARSampling, k: int, noise: torch.Tensor, cond: torch.Tensor,
                       cond_null: torch.Tensor | None, grid: torch.Tensor) -> torch.Tensor:
    """The teacher's guided solve of scale k from ``noise`` (B, N, C) at t = 1, every state on ``grid`` (from 1
    down to 0): (len(grid), B, N, C) float64. The solver of ``sampling`` steps from one grid point to the next
    (one step of a fixed-step solver, an adaptive solve for dopri5), with its guidance weight and interval."""
    o, c = sampling, teacher.config
    guidance = None if cond_null is None else o.guidance_at(k, len(c.scales), cond_null.float())
    velocity = HeadVelocity(teacher.flownet, cond.float(), guidance=guidance, dtype=torch.float32)
    solve = SolveOptions(solver=o.solver, steps=None if o.solver in ADAPTIVE_SOLVERS else 1, schedule="uniform",
                         atol=o.atol, rtol=o.rtol)
    states, x = [noise.to(torch.float64)], noise.float()
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        state, _ = integrate(velocity, x, solve, jumps=velocity.jumps, span=(t_cur, t_next))
        states.append(state)
        # The head takes float32 states; rounding the float64 state at each grid point is far below the solve's error.
        x = state.to(torch.float32)
    return torch.stack(states)


def training_pairs(jump_index: torch.Tensor, points: int, batch: int, generator: torch.Generator, *,
                   random_pairs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid indices (start, end), start < end (t_start > t_end), each (K + random_pairs, batch) for the K jumps
    between the grid points ``jump_index`` (K + 1,): row j < K is the j-th jump for every image, each of the last
    ``random_pairs`` rows one random pair of the teacher grid's ``points`` points per image."""
    jumps = len(jump_index) - 1
    start, end = [jump_index[:-1, None].expand(jumps, batch)], [jump_index[1:, None].expand(jumps, batch)]
    for _ in range(random_pairs):
        first = torch.randint(0, points, (batch,), generator=generator)
        second = torch.randint(0, points - 1, (batch,), generator=generator)
        second = second + (second >= first).long()  # a uniform pair of distinct points
        start.append(torch.minimum(first, second)[None])
        end.append(torch.maximum(first, second)[None])
    return torch.cat(start), torch.cat(end)


def scale_solves(teacher: FlowAR, student: FlowAR, latents: torch.Tensor, labels: torch.Tensor,
                 jumps: int | tuple[int, ...],
                 generator: torch.Generator, *, sampling: FlowARSampling, schedule: str = "uniform",
                 prefix: str = "data", global_batch: int | None = None, rows: slice = slice(None)):
    """Yield, scale by scale, (k, cond (B, s*s, D), grid, jump_index, states): scale k's class conditions and the
    teacher's solve of ``sampling`` from fresh noise on its grid of ``schedule`` (``teacher_grid``,
    ``teacher_trajectory``) for scale k's count of ``jumps`` (``jumps_at``).

    ``prefix`` says what conditions each scale (see PREFIXES). Scale k's noise is drawn from ``generator`` for
    the whole global batch when the generator reaches scale k, and this process keeps its ``rows``: a consumer
    that draws from the same generator between scales draws after that scale's noise."""
    if prefix not in PREFIXES:
        raise ValueError(f"prefix must be one of {', '.join(PREFIXES)}, got {prefix!r}")
    c = teacher.config
    global_batch = global_batch or latents.shape[0]
    teacher._check_latents(latents)
    pyramid = area_pyramid(latents, c.scales)
    cond, cond_null = teacher_conditions(teacher, pyramid, labels, guided=sampling.guided)
    for k, side in enumerate(c.scales):
        if prefix != "data" and k > 0:  # scale k's conditions from the maps drawn at the scales before it
            cond, cond_null = teacher_conditions(teacher, pyramid, labels, guided=sampling.guided)
        noise = torch.randn((global_batch, side * side, c.token_dim), generator=generator)[rows].to(latents.device)
        grid, jump_index = teacher_grid(sampling, k, jumps_at(jumps, k), schedule)
        states = teacher_trajectory(teacher, sampling, k, noise, cond[k], None if cond_null is None else cond_null[k],
                                    grid)
        yield k, cond[k], grid, jump_index, states
        if prefix == "teacher":
            pyramid[k] = from_tokens(states[-1].float(), side)
        elif prefix == "student":
            with torch.no_grad():
                jumped = student.flownet.sample(noise, cond[k].float(), student.config.sampling.solve_at(k)).x
            pyramid[k] = from_tokens(jumped.float(), side)


def distillation_loss(teacher: FlowAR, student: FlowAR, latents: torch.Tensor, labels: torch.Tensor,
                      jumps: int | tuple[int, ...], generator: torch.Generator, *, sampling: FlowARSampling | None = None,
                      schedule: str = "uniform", prefix: str = "data", random_pairs: int = 1,
                      global_batch: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """Per-scale losses (K,): the squared error of the student's average velocity against the teacher's chords.

    ``latents`` and ``labels`` are this process's ``rows`` of a global batch of ``global_batch`` images (default:
    all of it). The targets are the solve of ``sampling`` (default: the teacher's saved one) on ``schedule``'s grid
    under ``prefix``'s conditions (``scale_solves``), at the sampling's jumps and ``random_pairs`` other pairs of
    grid points per image (``training_pairs``). The generator draws, in order, each scale's noise and then its
    random pairs, for the whole global batch, and this process keeps its rows."""
    sampling = sampling or teacher.config.sampling
    global_batch = global_batch or latents.shape[0]
    batch = latents.shape[0]
    losses = []
    for k, cond, grid, jump_index, states in scale_solves(teacher, student, latents, labels, jumps, generator,
                                                          sampling=sampling, schedule=schedule, prefix=prefix,
                                                          global_batch=global_batch, rows=rows):
        pairs = training_pairs(jump_index, len(grid), global_batch, generator, random_pairs=random_pairs)
        start, end = (index[:, rows].reshape(-1) for index in pairs)
        rows_of = torch.arange(start.shape[0]) % batch
        t, r = grid[start].to(latents.device), grid[end].to(latents.device)
        x_t, x_r = states[start, rows_of], states[end, rows_of]
        target = ((x_t - x_r) / (t - r)[:, None, None]).float()
        u = student.flownet.conditioned(cond[rows_of].float())(x_t.float(), t.float(), r.float())
        losses.append((u.float() - target).pow(2).mean())
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------- loop
def check_arguments(args) -> None:
    jumps = args.jumps_per_scale if isinstance(args.jumps_per_scale, tuple) else (args.jumps_per_scale,)
    for name, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--seed", args.seed, 0),
                               ("--jumps-per-scale", min(jumps), 1), ("--random-pairs", args.random_pairs, 0),
                               ("--checkpoint-every", args.checkpoint_every, 1), ("--sample-every", args.sample_every, 0)):
        if value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema must be a decay in [0, 1), got {args.ema}")


def step_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (from 0) of ``steps``: ``lr`` throughout, or half a cosine from ``lr``
    down to 0 at the last step."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def average_gradients(parameters, world: int) -> None:
    """The mean of every process's gradient, in place (the head is small: one all-reduce per tensor)."""
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def distill(args) -> Path:
    check_arguments(args)
    out = Path(args.out)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    if args.batch % world:
        raise ValueError(f"--batch ({args.batch}) must be divisible by the {world} processes")
    local = args.batch // world
    rows = slice(rank * local, (rank + 1) * local)
    teacher, vae = load_teacher(args.teacher)
    c = teacher.config
    source = CachedLatents(args.latent_cache, seed=args.seed)
    expected = (c.token_dim, c.scales[-1], c.scales[-1])
    if tuple(source.latent_shape) != expected:
        raise ValueError(f"--latent-cache {args.latent_cache} holds latents {tuple(source.latent_shape)} but the "
                         f"teacher expects {expected}")
    if not c.unconditional and source.num_classes > c.num_classes:
        raise ValueError(f"--latent-cache {args.latent_cache} holds {source.num_classes} classes but the teacher "
                         f"knows {c.num_classes}")
    if args.batch > source.num_items:
        raise ValueError(f"--batch ({args.batch}) exceeds the latent cache's {source.num_items} items")
    sampling = target_sampling(teacher, solver=args.teacher_solver, steps=args.teacher_steps,
                               guidance_scale=args.teacher_guidance)
    teacher.to(device)
    student = build_student(teacher, args.jumps_per_scale, seed=args.seed).to(device)
    head = student.flownet
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {name: p.detach().float().clone() for name, p in head.named_parameters()}
    checkpoints = CheckpointManager(out)
    settings = {"teacher": str(Path(args.teacher).resolve()), "batch": args.batch, "lr": args.lr,
                "lr_schedule": args.lr_schedule, "seed": args.seed,
                # a cosine's rate at a step depends on the run's length, so a resumed run must keep it
                **({"steps": args.steps} if args.lr_schedule == "cosine" else {}),
                "jumps_per_scale": list(args.jumps_per_scale) if isinstance(args.jumps_per_scale, tuple)
                else args.jumps_per_scale, "ema": args.ema, "prefix": args.prefix,
                "teacher_solver": sampling.solver, "teacher_schedule": args.teacher_schedule,
                "random_pairs": args.random_pairs, "precision": args.precision,
                "teacher_guidance": sampling.guidance_scale,
                "teacher_steps": list(sampling.steps) if isinstance(sampling.steps, tuple) else sampling.steps}
    start_step = 0
    if args.resume:
        state = checkpoints.load_last(map_location=device)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint in --out {out}")
        # A checkpoint without these keys was made with the data prefix, the uniform grid, a constant rate, one
        # random pair and float32.
        saved = {"prefix": "data", "teacher_schedule": "uniform", "lr_schedule": "constant", "random_pairs": 1,
                 "precision": "fp32", **state["settings"]}
        differ = sorted(k for k in settings if saved.get(k) != settings[k])
        if differ:
            raise ValueError(f"--resume: the checkpoint was made with other {', '.join(differ)}")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        ema = {name: value.to(device) for name, value in state["ema"].items()}
        start_step = state["step"]

    writer = grids = None
    teacher_logged = False
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step if args.resume else None)
        if args.sample_every and vae is not None:
            grids = SampleGrid(teacher, device)
            vae.to(device)
        elif args.sample_every:
            print(f"distill_head: TEACHER {args.teacher} is a bare model folder (no vae/): no sample grids")
    bar = tqdm(total=args.steps, initial=start_step, desc="distill", disable=not (is_main and args.progress),
               dynamic_ncols=True)
    for step in range(start_step, args.steps):
        generator = step_generator(args.seed, step, "cpu")
        indices = source.batch_indices(step, args.batch, generator)
        randomness = source.draw_randomness(args.batch, generator)
        latents, labels = source.get(indices[rows], {key: value[rows] for key, value in randomness.items()})
        latents, labels = latents.to(device), labels.to(device)
        with autocast_context(device, PRECISIONS[args.precision]):
            per_scale = distillation_loss(teacher, student, latents, labels, args.jumps_per_scale, generator,
                                          sampling=sampling, schedule=args.teacher_schedule, prefix=args.prefix,
                                          random_pairs=args.random_pairs, global_batch=args.batch, rows=rows)
        loss = per_scale.mean()  # every scale's jumps count alike: each one is a step of the sample
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        per_scale = per_scale.detach()
        if world > 1:
            average_gradients(head.parameters(), world)
            dist.all_reduce(per_scale)
            per_scale /= world
        loss_value = per_scale.mean().item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value} at step {step}; the last checkpoint is left untouched")
        for group in optimizer.param_groups:  # a function of the step, so a resumed run follows it too
            group["lr"] = step_lr(args.lr, args.lr_schedule, step, args.steps)
        optimizer.step()
        done = step + 1
        update_ema(ema, head, ema_decay(args.ema, done, bias_correction=True))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if is_main:
            writer.add_scalar("distill/loss", loss_value, done)
            for k, side in enumerate(c.scales):
                writer.add_scalar(f"distill/loss_scale_{side}x{side}", per_scale[k].item(), done)
            if grids is not None and (done % args.sample_every == 0 or done == args.steps):
                if not teacher_logged:  # the teacher's samples from the same noise, once, beside the first grid
                    grids.log(writer, "samples/teacher_grid", teacher, vae, done)
                    teacher_logged = True
                grids.log(writer, "samples/student_grid", student, vae, done)
        if done % args.checkpoint_every == 0 or done == args.steps:
            if is_main:
                checkpoints.save({"head": head.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                                  "step": done, "settings": settings})
            if world > 1:
                dist.barrier()
    bar.close()
    release = out / "release"
    if is_main:
        writer.close()
        head.load_state_dict(ema, strict=False)  # the release holds the averaged head (--ema 0: the trained one)
        names = read_class_names(args.teacher, student.config.num_classes)  # the teacher's, shown by applications
        if vae is not None:
            FlowARPipeline(student, vae, class_names=names).save_pretrained(release)
        else:
            student.save_pretrained(release)
            if names is not None:
                write_class_names(release, names)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return release


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="FlowAR pipeline or model folder")
    p.add_argument("--latent-cache", required=True, help="folder written by train.cache_latents")
    p.add_argument("--out", required=True, help="folder for checkpoints, tensorboard/ and release/")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant, or cosine: half a cosine from --lr down to 0 at --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jumps-per-scale", type=parse_step_counts, default=1, metavar="K or K1/K2/...",
                   help="flow-map jumps per scale the student trains and samples with: one count, or one per scale "
                        "such as 1/2/2/3")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of the head's weight average, bias-corrected, which the release holds (0: none)")
    p.add_argument("--teacher-solver", choices=ODE_SOLVERS, default=None,
                   help="the ODE solver of the target solve (default: the teacher's saved one)")
    p.add_argument("--teacher-steps", type=parse_step_counts, default=None, metavar="N or N1/N2/...",
                   help="steps per scale of the target solve, one count or one per scale (default: the teacher's "
                        "saved ones); each is rounded up to a multiple of the jumps")
    p.add_argument("--teacher-schedule", choices=SCHEDULES, default="uniform",
                   help="the target solve's grid: uniform (its step count rounded up to a multiple of the jumps), or "
                        "the released sampler's flowar grid with the jump times inserted")
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="guidance scale of the target solve, which the unguided student inherits (default: the "
                        "teacher's saved one)")
    p.add_argument("--prefix", choices=PREFIXES, default="data",
                   help="what conditions each scale: the cached latents (teacher forcing), or the maps drawn at the "
                        "scales before it by the teacher's target solves or by the student's own jumps")
    p.add_argument("--random-pairs", type=int, default=1,
                   help="pairs of the teacher grid's points per image trained beside the sampling's jumps (0: the "
                        "jumps alone)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="bf16: the teacher's solve and the student's step under bf16 autocast (fast on CPUs with AMX or "
                        "AVX-512 bf16 and on GPUs); fp32: float32 throughout")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=500, help="steps between TensorBoard sample grids (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        distill(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"distill_head: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
