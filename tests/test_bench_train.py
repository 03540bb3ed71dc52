"""The training benchmark measures the real step of every family and reports sane, self-consistent numbers;
its run beside the authors' step (tools.bench_reference train) reuses it."""

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import fake_flowar_checkout
from flowar import FlowAR, get_preset
from tools import bench_reference
from train import bench, demo
from train import train as trainer
from train.bench import (build_tokenizer, count_flops, demo_training, main, measure, measure_demo, our_step,
                         preset_training, step_flops)
from train.train import param_groups

TINY_PRESETS = ["flowar-tiny", "var-tiny", "flexvar-tiny", "xar-tiny"]


def forward_flops(batch: int) -> int:
    torch.manual_seed(0)
    model = FlowAR(get_preset("flowar-tiny"))
    c = model.config
    latents = torch.randn(batch, c.token_dim, c.scales[-1], c.scales[-1])
    counter = FlopCounterMode(display=False)
    with counter:
        model(latents, torch.zeros(batch, dtype=torch.long))
    return counter.get_total_flops()


def test_a_training_step_costs_about_three_forwards():
    row = measure("flowar-tiny", 4, "fp32", "cpu", 0, 1)
    assert row["images/s"] > 0 and row["ms/step"] > 0 and row["peak MiB"] > 0
    ratio = row["GFLOP/image"] * 1e9 * 4 / forward_flops(4)
    assert 2.5 < ratio < 3.5  # backward is about twice the forward


def record_models(monkeypatch) -> list:
    """Make train.bench build its models through a recorder: returns the list of (model, initial weights)."""
    built = []

    def recording_build_model(cfg):
        model = trainer.build_model(cfg)
        built.append((model, {name: p.detach().clone() for name, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(bench, "build_model", recording_build_model)
    return built


def test_steps_update_the_weights_like_training(monkeypatch):
    built = record_models(monkeypatch)
    measure("flowar-tiny", 2, "bf16", "cpu", 1, 2)  # warm-up, the counted step and 2 timed steps: 4 AdamW steps
    (model, before), = built
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    # Every parameter tensor gets a gradient from the flow loss over all scales, so every one moves, and by
    # AdamW-sized steps: the first moves each element by lr = 1e-4 exactly (m / sqrt(v) = sign(g)), the later
    # ones by about as much, so after 4 steps each tensor has moved more than one step, never much over 4.
    slow = {name: d for name, d in moved.items() if d <= 1e-4}
    assert not slow, f"parameters that moved less than one AdamW step: {slow}"
    assert max(moved.values()) < 2 * 4 * 1e-4


def test_with_lr_zero_the_steps_leave_the_weights_alone(monkeypatch):
    """Only the optimiser moves the weights (not the EMA update, not the loss): with lr 0 nothing changes."""
    built = record_models(monkeypatch)
    real_adamw = torch.optim.AdamW

    def adamw_at_lr_zero(*args, **kwargs):
        optimizer = real_adamw(*args, **kwargs)
        for group in optimizer.param_groups:  # also weight decay, which AdamW scales by lr
            group["lr"] = 0.0
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", adamw_at_lr_zero)
    measure("flowar-tiny", 2, "fp32", "cpu", 1, 1)
    (model, before), = built
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_cli_runs_each_precision_in_its_own_process(capsys):
    assert main(["--preset", "flowar-tiny", "--batch", "2", "--precision", "fp32,bf16", "--warmup", "0",
                 "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| bf16 |" in out and "speed-up vs fp32" in out


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "--precision"),
    (["--batch", "0"], "--batch"),
    (["--steps", "0"], "--steps"),
    (["--reference", "."], "--reference"),  # the authors' step is timed by tools.bench_reference only
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "flowar-tiny", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "--preset"),
    (["--demo", "flowar,nope"], "--demo"),
    (["--demo", "flowar-fewstep"], "--demo"),  # a distillation after the flowar row's training, not a train step
    (["--demo", "flowar", "--preset", "flowar-tiny"], "--preset"),
    (["--preset", "var-tiny", "--checkpointing", "off,on"], "--checkpointing"),  # FlowAR's models only
    (["--demo", "flowar,xar", "--checkpointing", "on"], "--checkpointing"),
])
def test_bad_models_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    captured = capsys.readouterr()
    assert "error: " + message in captured.err and captured.out == ""  # refused before anything runs


@pytest.mark.parametrize("argv, message", [
    (["--preset", "flowar-tiny", "--reference", "."], "--reference"),
    (["--preset", "flowar-s"], "--reference"),  # required
    (["--reference", ".", "--batch", "0"], "--batch"),
    (["--reference", ".", "--demo", "flowar"], "--demo"),
])
def test_bad_reference_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_reference.main(["train", *argv])
    assert message in capsys.readouterr().err


def test_reference_mode_steps_the_authors_model_beside_ours(tmp_path, capsys):
    checkout = fake_flowar_checkout(tmp_path / "FlowAR")
    assert bench_reference.main(["train", "--preset", "flowar-s", "--batch", "2", "--small", "--reference", checkout,
                                 "--warmup", "0", "--steps", "1", "--precision", "fp32,bf16",
                                 "--checkpointing", "off,on"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| authors") or line.startswith("| ours")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [(c[0], c[1], c[3]) for c in cells] == [("authors", "fp32", "off"), ("ours", "fp32", "off"),
                                                   ("ours", "fp32", "on"), ("ours", "bf16", "off"),
                                                   ("ours", "bf16", "on")]
    header = [c.strip() for c in next(l for l in out.splitlines() if l.startswith("| step")).strip("|").split("|")]
    flops = [float(c[header.index("GFLOP/image")]) for c in cells]
    # The stand-in's step is our own loss on the same model, so the FLOPs agree; checkpointing recomputes the
    # transformer's forward in the backward, which costs more.
    assert flops[1] == pytest.approx(flops[0], rel=0.02) and flops[2] > flops[1] * 1.05
    assert float(cells[0][header.index("peak MiB")]) > 0  # theirs, from its own process
    assert "speed-up vs authors fp32: fp32" in out


def test_the_ema_update_is_one_foreach_lerp_of_every_parameter():
    from train.train import update_ema

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    update_ema(ema, model, 0.75)
    for name, p in model.named_parameters():
        assert torch.allclose(ema[name], 0.25 * p.detach(), atol=1e-7), name


def test_the_optimizer_is_fused_adamw_over_flowars_groups():
    from train.train import build_optimizer

    model = FlowAR(get_preset("flowar-tiny"))
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.02]
    # Fused and the per-tensor loop make the same update, to float rounding.
    loop = torch.optim.AdamW(param_groups(reference := FlowAR(get_preset("flowar-tiny")), 0.02), lr=1e-3,
                             betas=(0.9, 0.95))
    reference.load_state_dict(model.state_dict())
    latents = torch.randn(2, 4, 8, 8)
    for net, opt in ((model, optimizer), (reference, loop)):
        torch.manual_seed(0)  # the same dropout masks
        net(latents, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0)).loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


# ---------------------------------------------------------------------------------------------- every family
def tiny_step(preset: str, batch: int, **recipe):
    """A preset row's model and step, built as train.bench's rows build them, with ``recipe`` TrainConfig fields."""
    cfg, tokenizer = preset_training(preset)
    cfg = dataclasses.replace(cfg, **recipe)
    torch.manual_seed(0)
    model = trainer.build_model(cfg).train()
    return model, our_step(model, batch, "fp32", torch.device("cpu"), cfg=cfg, tokenizer=build_tokenizer(tokenizer))


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_each_familys_step_trains_its_model(preset):
    """The step is train.train's: on a fixed batch, at the demo's lr, every family's loss falls and its weights move."""
    model, step = tiny_step(preset, 8, lr=3e-3, ema=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = [float(step()) for _ in range(24)]
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses  # (measured: 0.15 to 0.78 of it)
    still = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not still


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_a_steps_flops_are_positive_and_proportional_to_the_batch(preset):
    counts = []
    for batch in (2, 4):
        model, step = tiny_step(preset, batch)
        scales = {"scales": model.config.scales} if getattr(model.config, "scale_lists", "fixed") == "random" else {}
        counts.append(count_flops(step, *scales.values()))
    assert counts[0] > 0
    assert counts[1] == pytest.approx(2 * counts[0], rel=0.1)


def test_a_random_list_models_flops_are_the_mean_over_its_lists():
    model, step = tiny_step("flexvar-tiny", 4)
    flops, lists = step_flops(step, model, 4)
    assert lists > 1  # several lists, each counted once
    fixed = count_flops(step, model.config.scales)
    full = count_flops(step, (1, 2, 3, 4, 5, 6, 7, 8))  # every side: more tokens than any list it draws
    assert fixed < flops < full
    model, step = tiny_step("xar-tiny", 4)
    assert step_flops(step, model, 4) == (count_flops(step), 1)  # fixed cells: one count of the step


# ---------------------------------------------------------------------------------------------- the demo's models
@pytest.mark.parametrize("name", bench.DEMOS)
def test_demo_rows_build_train_demos_own_models_and_step_counts(name):
    cfg, tokenizer, steps = demo_training(name)
    assert steps == {"flowar-flexible": demo.FLEXIBLE_STEPS, "xar": demo.XAR_STEPS}.get(name, demo.DEMO_STEPS)
    assert f"global_batch={cfg.global_batch}" in demo.TRAINING
    config = trainer.build_model(cfg).config
    for key, value in demo.MODELS[name].items():  # the demo's dict, field for field
        if key != "sampling":
            assert json.loads(json.dumps(getattr(config, key))) == value, key  # tuples as the dict's lists
    assert (tokenizer is not None) == (name == "var")  # VAR's transformer takes the tokenizer's codebook
    if tokenizer is not None:
        assert (tuple(config.scales), config.vocab_size) == (tuple(tokenizer.scales), tokenizer.codebook_size)


def test_demo_rows_give_the_demos_steps_and_training_compute(capsys):
    assert main(["--demo", "xar,var", "--batch", "2", "--warmup", "0", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert set(rows) == {"xar", "var"} and header[-2:] == ["demo steps", "demo TFLOP"]
    assert int(rows["xar"]["demo steps"]) == demo.XAR_STEPS and int(rows["var"]["demo steps"]) == demo.DEMO_STEPS
    for name, row in rows.items():  # steps x the demo's batch of 64 x FLOPs per image, whatever --batch
        expected = int(row["demo steps"]) * 64 * float(row["GFLOP/image"]) / 1e3
        assert float(row["demo TFLOP"]) == pytest.approx(expected, rel=0.01), name
        assert float(row["GFLOP/step"]) == pytest.approx(2 * float(row["GFLOP/image"]), rel=0.01)
    assert "speed-up vs xar fp32: var fp32" in out


def test_a_demo_rows_flops_do_not_depend_on_its_batch():
    one, two = (measure_demo("xar", batch, "fp32", "cpu", 0, 1) for batch in (1, 2))
    assert one.row["demo TFLOP"] == pytest.approx(two.row["demo TFLOP"], rel=1e-6)
    assert one.row["params (M)"] == two.row["params (M)"] > 0 and one.lists == 1
