"""FlowAR's training levers: each is off by default, where the loss and the samples are the
released model's; on, each does what its config comment says; bad values name the argument."""

import math

import pytest
import torch
from conftest import gen, tiny_flowar

from flowar import PRESETS, FlowARConfig, get_preset
from flowar.model import to_tokens
from flowar.sampling import generate
from heads import FlowHead
from heads.multistage import stages_from_ends
from heads.path import draw_times
from vae.pyramid import area_pyramid

LEVER_DEFAULTS = {"time_distribution": "uniform", "time_logit_mean": 0.0, "time_logit_std": 1.0,
                  "scale_weights": "area", "head_batch_mul": 1, "context_noise": 0.0}
STAGES = stages_from_ends([0.6, 0.4, 0.25])
LEVERS_ON = {"time_distribution": "logit-normal", "scale_weights": "equal", "head_batch_mul": 3,
             "context_noise": 0.5}


class ZeroVelocity(FlowHead, torch.nn.Module):
    """A head that predicts v = 0: a scale's flow loss is then mean((eps - x)^2) whatever t or the condition is."""

    def forward(self, x_t, t, cond):
        return torch.zeros_like(x_t)


def batch(seed=0, size=3):
    g = gen(seed)
    return torch.randn(size, 4, 8, 8, generator=g), torch.tensor([0, 4, 9][:size])


def twin(model, **levers):
    """A model with the same weights as ``model`` and ``levers`` set in its config."""
    other = tiny_flowar(None, **levers)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_and_a_bare_config_have_the_levers_off(name):
    config = get_preset(name)
    assert {k: getattr(config, k) for k in LEVER_DEFAULTS} == LEVER_DEFAULTS
    bare = FlowARConfig()
    assert {k: getattr(bare, k) for k in LEVER_DEFAULTS} == LEVER_DEFAULTS


def test_the_default_loss_takes_every_draw_from_draw_randomness_in_its_order():
    # draw_randomness draws, from the one generator: the label-drop mask (B,), then t ~ U(0, 1) (B,) for every
    # scale, then the noise (B, s*s, C) of every scale. Recompute those draws from the same seed by hand.
    model = tiny_flowar(0).train()
    latents, labels = batch()
    out = model(latents, labels, generator=gen(7))
    g = gen(7)
    drop = torch.rand(3, generator=g) < model.config.label_drop
    labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    expected_times = [torch.rand(3, generator=g) for _ in model.config.scales]
    expected_noise = [torch.randn(3, s * s, 4, generator=g) for s in model.config.scales]
    by_hand = model(latents, labels, drop_mask=torch.zeros(3, dtype=torch.bool), flow_times=expected_times,
                    flow_noise=expected_noise)
    torch.testing.assert_close(out.loss, by_hand.loss, rtol=0, atol=0)
    # Passing every lever at its default value explicitly is the same model.
    explicit = twin(model, **LEVER_DEFAULTS)(latents, batch()[1], generator=gen(7))
    torch.testing.assert_close(explicit.loss, out.loss, rtol=0, atol=0)


def test_each_lever_changes_the_loss_from_the_same_seed():
    model = tiny_flowar(0).train()
    latents, labels = batch()
    released = model(latents, labels, generator=gen(5)).loss
    for name, value in LEVERS_ON.items():
        changed = twin(model, **{name: value})(latents, labels, generator=gen(5)).loss
        assert torch.isfinite(changed)
        assert not torch.allclose(changed, released), name


def test_sampling_ignores_the_training_levers():
    model = tiny_flowar(0)
    levered = twin(model, **LEVERS_ON)
    assert not levered.training
    a = generate(model, [1, 2, 3], generator=gen(11), steps=3)
    b = generate(levered, [1, 2, 3], generator=gen(11), steps=3)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert a.nfe == b.nfe


def test_logit_normal_times_have_the_asked_logit_mean_and_std():
    t = draw_times(200_000, generator=gen(0), distribution="logit-normal", logit_mean=0.5, logit_std=0.8)
    logits = torch.logit(t.double())
    assert logits.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)
    # On a span (s, e) the draw is e + (s - e) u: inside the span, and uniform draws are unchanged by the option.
    on_span = draw_times(10_000, (0.6, 0.2), generator=gen(1), distribution="logit-normal")
    assert 0.2 < on_span.min() and on_span.max() < 0.6
    torch.testing.assert_close(draw_times(50, generator=gen(2)), torch.rand(50, generator=gen(2)), rtol=0, atol=0)


def test_equal_scale_weights_sum_the_per_scale_losses():
    model = tiny_flowar(0, scale_weights="equal").train()
    model.flownet = ZeroVelocity()
    # Zero latents and constant noise c = 1, 2, 3, 4 per scale: per-scale losses c^2, summed with weight 1 each.
    latents = torch.zeros(2, 4, 8, 8)
    noise = [torch.full((2, s * s, 4), float(c)) for c, s in zip((1, 2, 3, 4), (1, 2, 4, 8))]
    times = [torch.full((2,), 0.5) for _ in range(4)]
    out = model(latents, torch.tensor([0, 1]), flow_times=times, flow_noise=noise)
    assert out.loss.item() == pytest.approx(1 + 4 + 9 + 16)


def test_head_batch_mul_is_the_mean_of_m_single_draw_losses():
    m = 3
    model = tiny_flowar(0, head_batch_mul=m).train()
    single = twin(model, head_batch_mul=1)
    latents, labels = batch()
    draws = model.draw_randomness(3, generator=gen(4))
    draws["drop_mask"] = torch.zeros(3, dtype=torch.bool)
    assert draws["flow_times"][2].shape == (3, m) and draws["flow_noise"][2].shape == (3, m, 16, 4)
    keep = draws["drop_mask"]
    out = model(latents, labels, **draws)
    per_draw = [single(latents, labels, drop_mask=keep, flow_times=[t[:, j] for t in draws["flow_times"]],
                       flow_noise=[n[:, j] for n in draws["flow_noise"]]).loss_per_scale for j in range(m)]
    # The transformer's condition is the same for every draw (dropout is off in flowar-tiny), so the m-fold loss
    # per scale is the mean of m ordinary ones.
    torch.testing.assert_close(out.loss_per_scale, torch.stack(per_draw).mean(0), rtol=1e-5, atol=1e-6)


def test_noisy_context_noises_only_the_inputs_and_level_zero_is_off():
    model = tiny_flowar(0, context_noise=0.5).train()
    released = twin(model)
    latents, labels = batch()
    keep = torch.zeros(3, dtype=torch.bool)
    draws = model.draw_randomness(3, generator=gen(8))
    draws["drop_mask"] = keep
    scales = model.config.scales
    assert len(draws["context_levels"]) == len(scales) - 1
    assert all(0 <= lv.min() and lv.max() <= 0.5 for lv in draws["context_levels"])
    flow = {"flow_times": draws["flow_times"], "flow_noise": draws["flow_noise"]}
    zero = [torch.zeros(3) for _ in scales[:-1]]
    clean = model(latents, labels, drop_mask=keep, **flow, context_levels=zero, context_noise=draws["context_noise"])
    torch.testing.assert_close(clean.loss, released(latents, labels, drop_mask=keep, **flow).loss, rtol=0, atol=0)
    noisy = model(latents, labels, **draws)
    assert not torch.allclose(noisy.loss, clean.loss)
    # The targets stay the clean token maps: under a head that ignores its condition the loss is unchanged.
    model.flownet = ZeroVelocity()
    ignoring = model(latents, labels, **draws).loss_per_scale
    pyramid = area_pyramid(latents, scales)
    expected = torch.stack([((eps - to_tokens(x)) ** 2).mean() for eps, x in zip(draws["flow_noise"], pyramid)])
    torch.testing.assert_close(ignoring, expected)


def test_the_trainer_splits_lever_draws_by_rows():
    # train.train slices every draw along dim 0 for each process: the m-fold and context draws lead with B.
    model = tiny_flowar(0, head_batch_mul=2, context_noise=0.2)
    draws = model.draw_randomness(6, generator=gen(0))
    for key, tensors in draws.items():
        for t in (tensors if isinstance(tensors, list) else [tensors]):
            assert t.shape[0] == 6, key


@pytest.mark.parametrize("overrides, match", [
    ({"time_distribution": "gaussian"}, "time_distribution must be one of"),
    ({"time_distribution": "logit-normal", "time_logit_std": 0.0}, "time_logit_std must be > 0"),
    ({"time_logit_mean": 1.0}, "only apply to time_distribution='logit-normal'"),
    ({"scale_weights": "sqrt"}, "scale_weights must be one of"),
    ({"head_batch_mul": 0}, "head_batch_mul must be an integer >= 1"),
    ({"head_batch_mul": 2.5}, "head_batch_mul must be an integer >= 1"),
    ({"context_noise": -0.1}, r"context_noise must be in \[0, 1\]"),
    ({"context_noise": 1.5}, r"context_noise must be in \[0, 1\]"),
    ({"flow": "multistage", "stage_times": STAGES, "head_batch_mul": 2}, "for flow='full' only"),
    ({"flow": "multistage", "stage_times": STAGES, "context_noise": 0.1}, "for flow='full' only"),
])
def test_bad_lever_values_name_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_preset("flowar-tiny", **overrides)


def test_levers_survive_the_config_file_and_an_old_config_gets_the_defaults():
    config = get_preset("flowar-tiny", **LEVERS_ON, time_logit_mean=0.3)
    again = FlowARConfig.from_dict(config.to_dict())
    assert {k: getattr(again, k) for k in LEVERS_ON} == LEVERS_ON and again.time_logit_mean == 0.3
    old = {k: v for k, v in get_preset("flowar-tiny").to_dict().items() if k not in LEVER_DEFAULTS}
    assert {k: getattr(FlowARConfig.from_dict(old), k) for k in LEVER_DEFAULTS} == LEVER_DEFAULTS
    assert math.isclose(FlowARConfig.from_dict(old).context_noise, 0.0)
