"""FlowAR with a flow-map head: the config's levers, the MeanFlow objective through the model's one draw, and the
flow-map solver through the sampling engine."""

import pytest
import torch
from conftest import gen

from flowar import FlowAR, get_preset

LABELS = [1, 4]


def ordinary_and_flow_map():
    """An ordinary tiny FlowAR with a non-trivial head, and a flow-map FlowAR holding its weights."""
    torch.manual_seed(0)
    ordinary = FlowAR(get_preset("flowar-tiny")).eval()
    with torch.no_grad():  # the released init zeroes the head's output layer: every velocity would be 0
        ordinary.flownet.final_layer.linear.weight.normal_(std=0.1)
    flow_map = FlowAR(get_preset("flowar-tiny", flow_map=True)).eval()
    head_keys = {k for k in ordinary.state_dict() if k.startswith("flownet.")}
    rest = {k: v for k, v in ordinary.state_dict().items() if k not in head_keys}
    missing, unexpected = flow_map.load_state_dict(rest, strict=False)
    assert unexpected == [] and all(k.startswith("flownet.") for k in missing)
    flow_map.flownet.load_velocity_state({k[len("flownet."):]: ordinary.state_dict()[k] for k in head_keys})
    return ordinary, flow_map


@pytest.mark.parametrize("steps", [1, 3])
def test_an_untrained_flow_map_head_jumps_as_euler_steps_of_its_velocity(steps):
    """Loaded from an ordinary head, the flow map's interval embedding is zero: u(x_t, r, t) = v(x_t, t), and a
    jump x_t - (t - r) u is an Euler step, bit for bit, guided or not."""
    ordinary, flow_map = ordinary_and_flow_map()
    noise = flow_map.noise_from_seeds([3, 5])
    for guidance in (1.0, 2.0):
        euler = ordinary.sample_with_stats(LABELS, noise=noise, solver="euler", steps=steps, schedule="uniform",
                                           guidance_scale=guidance)
        jumps = flow_map.sample_with_stats(LABELS, noise=noise, solver="flow-map", steps=steps, schedule="uniform",
                                           guidance_scale=guidance)
        assert torch.equal(jumps.latents, euler.latents)
        assert jumps.nfe_per_scale == [steps] * 4 and jumps.head_rows == euler.head_rows


def test_the_flow_map_solver_is_refused_for_an_ordinary_head_by_name():
    ordinary, _ = ordinary_and_flow_map()
    with pytest.raises(ValueError, match=r"solver 'flow-map' .*\(flow_map=False\)"):
        ordinary.sample(LABELS, solver="flow-map", steps=2)


def test_mean_flow_training_draws_in_one_place_and_trains_the_interval_embedding():
    model = FlowAR(get_preset("flowar-tiny", flow_map=True, objective="mean-flow", mean_flow_adaptive_power=0.0)).train()
    assert model.flownet.time_embed.quantize is False  # d/dt through integer timesteps would be zero
    latents, labels = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.tensor([0, 5, 9])
    draws = model.draw_randomness(3, generator=gen(2))
    assert all((r <= t).all() for r, t in zip(draws["flow_ends"], draws["flow_times"]))
    out = model(latents, labels, generator=gen(2))
    again = model(latents, labels, **draws)
    assert torch.equal(out.loss, again.loss)  # forward's own draw is draw_randomness's
    out.loss.backward()
    assert model.flownet.interval_embed.mlp[2].weight.grad.abs().sum() > 0
    # r = t everywhere is plain flow matching: the same loss as the velocity objective on the same draws
    equal = dict(draws, flow_ends=list(draws["flow_times"]))
    velocity_twin = FlowAR(get_preset("flowar-tiny", flow_map=True)).train()
    velocity_twin.flownet.time_embed.quantize = False
    velocity_twin.load_state_dict(model.state_dict())
    given = {k: v for k, v in equal.items() if k != "flow_ends"}
    torch.testing.assert_close(model(latents, labels, **equal).loss, velocity_twin(latents, labels, **given).loss)
    # The paper's adaptive weight (p = 1) divides each sample's error by itself plus 1e-3: every term below 1.
    adaptive = FlowAR(get_preset("flowar-tiny", flow_map=True, objective="mean-flow")).train()
    adaptive.load_state_dict(model.state_dict())
    per_scale = adaptive(latents, labels, **draws).loss_per_scale
    assert ((per_scale > 0) & (per_scale < 1)).all() and (model(latents, labels, **draws).loss_per_scale > 1).any()


def test_flow_map_config_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="objective must be one of"):
        get_preset("flowar-tiny", objective="consistency")
    with pytest.raises(ValueError, match="needs flow_map=True"):
        get_preset("flowar-tiny", objective="mean-flow")
    with pytest.raises(ValueError, match="mean_flow_share_equal"):
        get_preset("flowar-tiny", flow_map=True, objective="mean-flow", mean_flow_share_equal=1.5)
    model = FlowAR(get_preset("flowar-tiny", flow_map=True, objective="mean-flow",
                              sampling={"solver": "flow-map", "steps": 2, "schedule": "uniform"}))
    model.save_pretrained(tmp_path / "m")
    loaded = FlowAR.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.config.sampling.solver == "flow-map"
    assert torch.equal(loaded.sample(LABELS, generator=gen(4)), model.eval().sample(LABELS, generator=gen(4)))
