"""The training benchmark measures the real step and reports sane, self-consistent numbers."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flowar import FlowAR, get_preset
from train import bench
from train.bench import main, measure


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
    """Make train.bench build its FlowAR through a recorder: returns the list of (model, initial weights)."""
    built = []

    def recording_flowar(config):
        model = FlowAR(config)
        built.append((model, {name: p.detach().clone() for name, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(bench, "FlowAR", recording_flowar)
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
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "flowar-tiny", *argv])
    assert message in capsys.readouterr().err
