"""Distilling a FlowAR's head into a flow-map head (train.distill_head): the student's jumps approach the
teacher's guided solve, a resumed run equals an uninterrupted one, and bad inputs are refused by name."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import gen, tiny_flowar_pipeline, tiny_var
from test_train import make_cache

from flowar import FlowAR, FlowARPipeline, get_preset
from flowar.sampling import guidance_excess
from heads.flow import Guidance
from heads.solvers import SolveOptions
from vae.pyramid import area_pyramid
from train.distill_head import build_student, load_teacher, main, scale_solves, target_sampling, teacher_conditions, \
    teacher_grid, \
    teacher_trajectory

LR = "3e-3"


@pytest.fixture(scope="module")
def teacher_and_cache(tmp_path_factory):
    """A tiny teacher pipeline whose head's velocities are not trivial, sampled (guided, weight 2 at the last
    scale) with 8 Euler steps on the uniform grid, and a cache of 16 latents."""
    root = tmp_path_factory.mktemp("distill")
    pipe = tiny_flowar_pipeline(0, sampling={"schedule": "uniform", "steps": 8})
    with torch.no_grad():  # the released init zeroes the head's output layer: every velocity would be 0
        pipe.model.flownet.final_layer.linear.weight.normal_(std=0.3, generator=gen(1))
    pipe.save_pretrained(root / "teacher")
    return root / "teacher", make_cache(root / "cache", n=16)


ROOT = Path(__file__).resolve().parents[1]


def run(teacher, cache, out, *extra):
    return main([str(teacher), "--latent-cache", str(cache), "--out", str(out), "--batch", "8", "--lr", LR,
                 "--no-progress", *extra])


def jump_error(teacher: FlowAR, student: FlowAR, latents, labels, *, guided_student: bool) -> float:
    """Mean squared distance, over scales and held-out noise, of the student's one jump per scale from the
    teacher's full guided solve, both conditioned by teacher forcing on ``latents``."""
    cond, cond_null = teacher_conditions(teacher, area_pyramid(latents, teacher.config.scales), labels, guided=True)
    o, c = teacher.config.sampling, teacher.config
    jump = SolveOptions(solver="flow-map", steps=1, schedule="uniform", atol=1e-5, rtol=1e-5)
    errors = []
    for k, side in enumerate(c.scales):
        noise = torch.randn((latents.shape[0], side * side, c.token_dim), generator=gen(100 + k))
        guidance = Guidance(cond_null[k], 1.0 + guidance_excess(o.guidance_scale, k, len(c.scales), o.cfg_schedule),
                            o.guidance_interval)
        target = teacher.flownet.sample(noise, cond[k], o.solve_at(k), guidance=guidance).x
        jumped = student.flownet.sample(noise, cond[k], jump, guidance=guidance if guided_student else None).x
        errors.append((jumped - target).pow(2).mean())
    return torch.stack(errors).mean().item()


def test_distillation_brings_one_jump_per_scale_to_the_teachers_solve(teacher_and_cache, tmp_path, one_thread):
    """Before distillation one jump is one Euler step of the teacher (guided, though t = 1 lies outside its guidance
    interval); after 30 steps the unguided student's jump lands at least 2x closer (in squared distance) to the
    teacher's 8-step guided endpoints, on noise it never trained on."""
    teacher_dir, cache = teacher_and_cache
    teacher, _ = load_teacher(teacher_dir)
    latents = torch.randn(8, 4, 8, 8, generator=gen(7))
    labels = torch.arange(8)
    before = jump_error(teacher, build_student(teacher, 1), latents, labels, guided_student=True)
    assert run(teacher_dir, cache, tmp_path / "run", "--steps", "30") == 0
    release = FlowARPipeline.from_pretrained(tmp_path / "run" / "release")
    student = release.model
    assert student.config.flow_map and student.config.sampling.solver == "flow-map"
    assert student.config.sampling.steps == 1 and student.config.sampling.guidance_scale == 1.0
    after = jump_error(teacher, student, latents, labels, guided_student=False)
    assert after < before / 2, (before, after)
    # Only the head trained: the transformer is the teacher's, bit for bit.
    trunk = {k: v for k, v in teacher.state_dict().items() if not k.startswith("flownet.")}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in trunk.items())
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_a_resumed_distillation_equals_an_uninterrupted_one(teacher_and_cache, tmp_path, one_thread):
    teacher_dir, cache = teacher_and_cache
    common = ("--jumps-per-scale", "2", "--checkpoint-every", "2", "--ema", "0.5")
    assert run(teacher_dir, cache, tmp_path / "whole", "--steps", "4", *common) == 0
    assert run(teacher_dir, cache, tmp_path / "split", "--steps", "2", *common) == 0
    assert run(teacher_dir, cache, tmp_path / "split", "--steps", "4", "--resume", *common) == 0
    whole, split = (torch.load(tmp_path / d / "checkpoint-last.pt", weights_only=True) for d in ("whole", "split"))
    assert whole["step"] == split["step"] == 4
    assert whole["head"].keys() == split["head"].keys()
    assert all(torch.equal(whole["head"][k], split["head"][k]) for k in whole["head"])
    assert all(torch.equal(whole["ema"][k], split["ema"][k]) for k in whole["ema"])
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert FlowAR.from_pretrained(tmp_path / "split" / "release").config.sampling.steps == 2


def test_per_scale_jumps_train_each_scales_own_jump_grid_and_are_saved_and_kept_by_a_resume(teacher_and_cache,
                                                                                           tmp_path, capsys):
    """--jumps-per-scale 1/2/2/3 on a teacher of 8 uniform steps: scale k's targets are taken at its own K + 1 jump
    times (the last scale's grid rounded up to 9 steps so that 2/3 and 1/3 are grid points), the release samples
    with those counts, and a resume with another count is refused."""
    teacher_dir, cache = teacher_and_cache
    teacher, _ = load_teacher(teacher_dir)
    student = build_student(teacher, (1, 2, 2, 3))
    latents, labels = torch.randn(2, 4, 8, 8, generator=gen(3)), torch.arange(2)
    solves = list(scale_solves(teacher, student, latents, labels, (1, 2, 2, 3), gen(4), sampling=teacher.config.sampling))
    for (k, _, grid, jump_index, states), jumps in zip(solves, (1, 2, 2, 3)):
        assert len(states) == len(grid) == (9 if jumps == 3 else 8) + 1
        torch.testing.assert_close(grid[jump_index], torch.linspace(1, 0, jumps + 1, dtype=torch.float64))
    common = ("--jumps-per-scale", "1/2/2/3", "--checkpoint-every", "1", "--sample-every", "0")
    assert run(teacher_dir, cache, tmp_path / "run", "--steps", "1", *common) == 0
    release = FlowAR.from_pretrained(tmp_path / "run" / "release")
    assert release.config.sampling.steps == (1, 2, 2, 3) and release.config.sampling.solver == "flow-map"
    assert run(teacher_dir, cache, tmp_path / "run", "--steps", "2", "--resume", "--jumps-per-scale", "2") == 2
    assert "made with other jumps_per_scale" in capsys.readouterr().err


def test_two_gloo_processes_distil_as_one_process_does(teacher_and_cache, tmp_path):
    """torchrun with 2 processes of 4 images each takes the same draws as one process of 8 and averages the
    gradients: the losses of 3 steps agree, and so do the heads, but for the few weights whose gradient is at
    rounding level (Adam's first steps move every weight by about lr times the sign of its gradient, so a
    gradient of 1e-9 against -1e-9 is a difference of 2 lr)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher_dir, cache = teacher_and_cache
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = [str(teacher_dir), "--latent-cache", str(cache), "--batch", "8", "--lr", LR, "--steps", "3",
              "--jumps-per-scale", "2", "--sample-every", "0", "--no-progress"]
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        cmd = [sys.executable, *launcher, "-m", "train.distill_head", *common, "--out", str(tmp_path / out)]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(tmp_path / d / "checkpoint-last.pt", weights_only=True) for d in ("one", "two"))
    start = build_student(load_teacher(teacher_dir)[0], 2).flownet.state_dict()
    losses = [[e.value for e in EventAccumulator(str(tmp_path / d / "tensorboard")).Reload().Scalars("distill/loss")]
              for d in ("one", "two")]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    moved = torch.cat([(one["head"][k] - start[k]).abs().flatten() for k in start])
    differ = torch.cat([(two["head"][k] - one["head"][k]).abs().flatten() for k in start])
    assert moved.max() > 1e-3, "the head trained"
    assert (differ < 1e-5).float().mean() > 0.999, differ.topk(10).values


def test_sample_grids_show_the_teacher_once_and_the_student_as_it_trains(teacher_and_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher_dir, cache = teacher_and_cache
    assert run(teacher_dir, cache, tmp_path / "run", "--steps", "4", "--sample-every", "2") == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples/teacher_grid")] == [2]
    student = events.Images("samples/student_grid")
    assert [e.step for e in student] == [2, 4]
    pictures = [np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in student]
    # One row of 8 square images per class (2 pixels of padding around each): 10 rows; the student changed
    # between the grids.
    height, width = pictures[0].shape[:2]
    assert (height - 2) / 10 == (width - 2) / 8 > 2
    assert not np.array_equal(pictures[0], pictures[1])


@pytest.mark.parametrize("extra, message", [
    (("--steps", "0"), "--steps must be an integer >= 1"),
    (("--batch", "0"), "--batch must be an integer >= 1"),
    (("--jumps-per-scale", "0"), "--jumps-per-scale must be an integer >= 1"),
    (("--jumps-per-scale", "1/0/2/2"), "--jumps-per-scale must be an integer >= 1"),
    (("--jumps-per-scale", "1/2"), r"--jumps-per-scale holds 2 counts but the teacher has 4 scales"),
    (("--lr", "nan"), "--lr must be a finite number > 0"),
    (("--ema", "1"), r"--ema must be a decay in \[0, 1\)"),
    (("--batch", "17"), r"--batch \(17\) exceeds the latent cache's 16 items"),
    (("--resume",), "--resume: no checkpoint"),
    (("--teacher-steps", "0"), "--teacher-solver / --teacher-steps / --teacher-guidance: .*steps"),
    (("--teacher-steps", "4/4"), "--teacher-solver / --teacher-steps / --teacher-guidance: .*steps"),
])
def test_bad_numbers_are_refused_by_name(teacher_and_cache, tmp_path, capsys, extra, message):
    teacher_dir, cache = teacher_and_cache
    assert run(teacher_dir, cache, tmp_path / "bad", *extra) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_teacher_that_is_no_flowar_and_a_cache_that_does_not_fit_are_refused_by_name(teacher_and_cache, tmp_path,
                                                                                     capsys):
    teacher_dir, cache = teacher_and_cache
    tiny_var(0).save_pretrained(tmp_path / "var")
    assert run(tmp_path / "var", cache, tmp_path / "out") == 2
    assert "TEACHER" in capsys.readouterr().err
    FlowAR(get_preset("flowar-tiny", token_dim=8)).save_pretrained(tmp_path / "wide")
    assert run(tmp_path / "wide", cache, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--latent-cache" in err and "teacher expects (8, 8, 8)" in err
    FlowAR(get_preset("flowar-tiny", num_classes=5)).save_pretrained(tmp_path / "five")
    assert run(tmp_path / "five", cache, tmp_path / "out") == 2
    assert "holds 10 classes but the teacher knows 5" in capsys.readouterr().err


def test_the_targets_are_the_chosen_solve_of_the_teacher(teacher_and_cache):
    """--teacher-solver midpoint --teacher-steps 4: the recorded states end where the teacher's own guided
    midpoint solve of 4 uniform steps ends, and pass through its 2-step solve's midpoint state."""
    teacher, _ = load_teacher(teacher_and_cache[0])
    sampling = target_sampling(teacher, solver="midpoint", steps=4)
    assert (sampling.solver, sampling.steps, sampling.guidance_scale) == ("midpoint", 4, teacher.config.sampling.guidance_scale)
    latents, labels = torch.randn(3, 4, 8, 8, generator=gen(2)), torch.tensor([1, 5, 9])
    cond, cond_null = teacher_conditions(teacher, area_pyramid(latents, teacher.config.scales), labels, guided=sampling.guided)
    k = 2
    noise = torch.randn(3, 16, 4, generator=gen(3))
    grid = torch.linspace(1, 0, 5, dtype=torch.float64)
    states = teacher_trajectory(teacher, sampling, k, noise, cond[k], cond_null[k], grid)
    c = teacher.config
    guidance = Guidance(cond_null[k], 1.0 + guidance_excess(sampling.guidance_scale, k, len(c.scales),
                                                            sampling.cfg_schedule), sampling.guidance_interval)
    whole = teacher.flownet.sample(noise, cond[k], SolveOptions(solver="midpoint", steps=4, schedule="uniform",
                                                                atol=1e-5, rtol=1e-5), guidance=guidance).x
    torch.testing.assert_close(states[-1].float(), whole.float(), rtol=1e-4, atol=1e-5)
    assert (states[-1] - states[0]).abs().max() > 0.1  # the solve moved


def test_teacher_guidance_sets_the_guidance_of_the_target_solve(teacher_and_cache):
    """--teacher-guidance G: the targets are the teacher's solve guided at G on its ramp (1: unguided, no null
    pass at all), not at its saved guidance."""
    teacher, _ = load_teacher(teacher_and_cache[0])
    latents, labels = torch.randn(2, 4, 8, 8, generator=gen(4)), torch.tensor([2, 7])
    noise = torch.randn(2, 16, 4, generator=gen(5))
    grid = torch.linspace(1, 0, 5, dtype=torch.float64)
    k, c = 2, teacher.config
    ends = {}
    for scale in (1.0, 1.5, c.sampling.guidance_scale):
        sampling = target_sampling(teacher, solver="euler", steps=4, guidance_scale=scale)
        cond, cond_null = teacher_conditions(teacher, area_pyramid(latents, teacher.config.scales), labels, guided=sampling.guided)
        assert (cond_null is None) == (scale == 1.0)
        ends[scale] = teacher_trajectory(teacher, sampling, k, noise, cond[k], None if cond_null is None else cond_null[k],
                                         grid)[-1]
        weight = 1.0 + guidance_excess(scale, k, len(c.scales), sampling.cfg_schedule)
        guidance = None if cond_null is None else Guidance(cond_null[k], weight, sampling.guidance_interval)
        own = teacher.flownet.sample(noise, cond[k], SolveOptions(solver="euler", steps=4, schedule="uniform",
                                                                  atol=1e-5, rtol=1e-5), guidance=guidance).x
        torch.testing.assert_close(ends[scale].float(), own.float(), rtol=1e-4, atol=1e-5)
    assert (ends[1.5] - ends[c.sampling.guidance_scale]).abs().max() > 1e-3  # the guidance changes the targets
    with pytest.raises(ValueError, match="--teacher-guidance"):
        target_sampling(teacher, guidance_scale=float("nan"))


def test_the_release_holds_the_average_head_with_ema_and_the_trained_one_without(teacher_and_cache, tmp_path):
    teacher_dir, cache = teacher_and_cache
    for decay in ("0", "0.9"):
        assert run(teacher_dir, cache, tmp_path / decay, "--steps", "3", "--ema", decay, "--sample-every", "0") == 0
        state = torch.load(tmp_path / decay / "checkpoint-last.pt", weights_only=True)
        released = FlowAR.from_pretrained(tmp_path / decay / "release").flownet.state_dict()
        assert all(torch.equal(released[k], state["ema"][k]) for k in state["ema"])
        same_as_trained = all(torch.equal(released[k], state["head"][k]) for k in state["head"])
        assert same_as_trained == (decay == "0")


@pytest.mark.parametrize("prefix", ["teacher", "student"])
def test_rollout_prefixes_condition_each_scale_as_that_models_sampling_does(teacher_and_cache, prefix):
    """--prefix teacher: the last scale's target solve ends where the teacher's own sampling (the target solve's
    settings) ends from the same per-scale noise, so every scale was conditioned on the teacher's draws.
    --prefix student: the last scale's conditions, jumped by the student, give the student's own sample. With
    the data's pyramid (--prefix data) neither holds."""
    teacher, _ = load_teacher(teacher_and_cache[0])
    student = build_student(teacher, 2, seed=3)
    with torch.no_grad():  # a student whose jumps differ from the teacher's Euler steps
        student.flownet.final_layer.linear.weight.add_(torch.randn(student.flownet.final_layer.linear.weight.shape,
                                                                   generator=gen(4)), alpha=0.1)
    sampling = target_sampling(teacher, solver="euler", steps=4)
    c = teacher.config
    latents, labels = torch.randn(3, 4, 8, 8, generator=gen(5)), torch.tensor([1, 4, 8])
    draws = gen(6)  # scale_solves draws each scale's noise in turn, nothing else
    noise = [torch.randn((3, side * side, c.token_dim), generator=draws) for side in c.scales]

    def last_scale(prefix):
        *_, (k, cond, grid, jump_index, states) = scale_solves(teacher, student, latents, labels, 2, gen(6), sampling=sampling,
                                                    prefix=prefix)
        return cond, states

    if prefix == "teacher":
        own = teacher.sample(labels, sampling=sampling, noise=noise)
        expected = own.flatten(2).transpose(1, 2)
        ends = {p: last_scale(p)[1][-1].float() for p in ("teacher", "data")}
    else:
        own = student.sample(labels, noise=noise)
        expected = own.flatten(2).transpose(1, 2)
        jump = student.config.sampling.solve_at(len(c.scales) - 1)
        ends = {p: student.flownet.sample(noise[-1], last_scale(p)[0].float(), jump).x for p in ("student", "data")}
    # The conditions come from one block-causal pass here and from cached passes in sampling, which round
    # differently over four scales; the data prefix misses by over 100x the tolerance.
    torch.testing.assert_close(ends[prefix], expected, rtol=1e-4, atol=1e-4)
    assert (ends["data"] - expected).abs().max() > 1e-2


def test_the_flowar_teacher_grid_is_the_released_grid_with_the_jump_times_inserted(teacher_and_cache):
    """--teacher-schedule flowar: the grid holds every point of the released grid of the target's step count and
    the uniform jump times, nothing else, and the jump indices point at those times. With one jump (times 1 and
    0, on the released grid already) the last state is the teacher's own Euler solve on that grid."""
    from heads.solvers import step_schedule

    teacher, _ = load_teacher(teacher_and_cache[0])
    sampling = target_sampling(teacher, solver="euler", steps=8)
    released = step_schedule(8, "flowar")
    grid, index = teacher_grid(sampling, 0, 2, "flowar")
    assert len(grid) == len(released) + 1 and set(released.tolist()) | {0.5} == set(grid.tolist())
    assert torch.all(grid[1:] < grid[:-1]) and grid[index].tolist() == [1.0, 0.5, 0.0]
    uniform, uniform_index = teacher_grid(sampling, 0, 3, "uniform")
    assert len(uniform) == 10 and uniform[uniform_index].tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0])

    grid, index = teacher_grid(sampling, 2, 1, "flowar")
    assert torch.equal(grid, released) and index.tolist() == [0, len(released) - 1]
    c, k = teacher.config, 2
    latents, labels = torch.randn(2, 4, 8, 8, generator=gen(8)), torch.tensor([3, 6])
    cond, cond_null = teacher_conditions(teacher, area_pyramid(latents, c.scales), labels, guided=True)
    noise = torch.randn(2, 16, 4, generator=gen(9))
    states = teacher_trajectory(teacher, sampling, k, noise, cond[k], cond_null[k], grid)
    guidance = Guidance(cond_null[k], 1.0 + guidance_excess(sampling.guidance_scale, k, len(c.scales),
                                                            sampling.cfg_schedule), sampling.guidance_interval)
    own = teacher.flownet.sample(noise, cond[k], SolveOptions(solver="euler", steps=8, schedule="flowar", atol=1e-5,
                                                              rtol=1e-5), guidance=guidance).x
    torch.testing.assert_close(states[-1].float(), own.float(), rtol=1e-4, atol=1e-5)


def test_the_cosine_rate_falls_from_lr_to_zero_and_a_resume_must_keep_its_length(teacher_and_cache, tmp_path, capsys):
    from train.distill_head import step_lr

    rates = [step_lr(1e-3, "cosine", step, 100) for step in range(100)]
    assert rates[0] == 1e-3 and rates[50] == pytest.approx(5e-4) and rates[-1] < 1e-6
    assert all(b < a for a, b in zip(rates, rates[1:]))
    assert {step_lr(1e-3, "constant", step, 100) for step in range(100)} == {1e-3}
    teacher_dir, cache = teacher_and_cache
    common = ("--lr-schedule", "cosine", "--checkpoint-every", "2", "--sample-every", "0")
    assert run(teacher_dir, cache, tmp_path / "run", "--steps", "2", *common) == 0
    assert run(teacher_dir, cache, tmp_path / "run", "--steps", "4", "--resume", *common) == 2
    assert "made with other steps" in capsys.readouterr().err


def test_training_pairs_are_the_jumps_then_the_random_pairs_asked_for():
    from train.distill_head import training_pairs

    jump_index = torch.tensor([0, 5, 10])
    for count in (0, 1, 3):
        generator = gen(4)
        start, end = training_pairs(jump_index, 11, 6, generator, random_pairs=count)
        assert start.shape == end.shape == (2 + count, 6)
        assert start[:2].tolist() == [[0] * 6, [5] * 6] and end[:2].tolist() == [[5] * 6, [10] * 6]
        assert bool((start[2:] < end[2:]).all()) and int(start.min()) >= 0 and int(end.max()) <= 10
        drawn = torch.randint(0, 2 ** 30, (1,), generator=generator)
        untouched = torch.randint(0, 2 ** 30, (1,), generator=gen(4))
        assert (drawn == untouched).item() == (count == 0)  # the jumps alone draw nothing


def test_bf16_precision_changes_a_steps_loss_by_little_and_a_resume_must_keep_the_precision(
        teacher_and_cache, tmp_path, capsys, one_thread):
    """The first step's loss (the same weights and draws) under bf16 autocast differs from float32's, so the
    autocast takes effect, by under 3%; a resume in float32 of a bf16 run is refused."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher_dir, cache = teacher_and_cache
    common = ("--steps", "1", "--checkpoint-every", "1", "--sample-every", "0")
    first = {}
    for precision in ("fp32", "bf16"):
        assert run(teacher_dir, cache, tmp_path / precision, *common, "--precision", precision) == 0
        events = EventAccumulator(str(tmp_path / precision / "tensorboard"))
        events.Reload()
        first[precision] = events.Scalars("distill/loss")[0].value
    assert first["fp32"] != first["bf16"]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.03)
    assert run(teacher_dir, cache, tmp_path / "bf16", "--steps", "2", "--resume", "--checkpoint-every", "1",
               "--sample-every", "0") == 2
    assert "made with other precision" in capsys.readouterr().err
