"""The multistage flow (heads.multistage): its path maths on samples, its reduction to FlowAR, and the model,
sampler and file paths that carry it."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import gen, tiny_flowar, tiny_flowar_pipeline

from flowar import FlowAR, get_preset, load_pipeline
from flowar.collaborative import collaborative_sample
from flowar.editing import inpaint
from heads import FlowHead, multistage
from heads.multistage import check_stage_times, min_start, renoise, stages_from_ends, training_stages
from heads.path import interpolate, segment_point, segment_velocity, velocity_target
from vae.pyramid import area_pyramid

STAGES = ((1.0, 0.6), (0.8, 0.4), (0.6, 0.25), (0.45, 0.0))  # each start above the jump's minimum
FULL = ((1.0, 0.0),) * 4


def multistage_flowar(seed=0, stage_times=STAGES, **overrides):
    return tiny_flowar(seed, flow="multistage", stage_times=stage_times, **overrides)


def covariance(samples: torch.Tensor) -> torch.Tensor:
    """(M, D) samples -> (D, D) sample covariance."""
    centred = samples - samples.mean(0)
    return centred.T @ centred / (samples.shape[0] - 1)


# ---------------------------------------------------------------------------------------------- path maths
def test_the_full_segment_is_flowars_path_bit_for_bit():
    x, noise = torch.randn(5, 7, 3, generator=gen(0)), torch.randn(5, 7, 3, generator=gen(1))
    t = torch.rand(5, generator=gen(2))
    assert torch.equal(segment_point(noise, x, t), interpolate(x, noise, t))
    assert torch.equal(segment_velocity(noise, x), velocity_target(x, noise))


def test_a_segment_runs_from_its_start_to_its_end_at_constant_velocity():
    start, end = torch.randn(3, 4, 2, generator=gen(0)), torch.randn(3, 4, 2, generator=gen(1))
    span = (0.7, 0.2)
    torch.testing.assert_close(segment_point(start, end, torch.full((3,), 0.7), span), start)
    torch.testing.assert_close(segment_point(start, end, torch.full((3,), 0.2), span), end)
    # A finite difference of the path is its velocity.
    a, b = segment_point(start, end, torch.full((3,), 0.5), span), segment_point(start, end, torch.full((3,), 0.4), span)
    torch.testing.assert_close((a - b) / 0.1, segment_velocity(start, end, span), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("previous_end, extra", [(0.5, 0.0), (0.5, 0.15), (0.2, 0.0), (0.0, 0.3)])
def test_the_jump_makes_white_noise_of_the_start_level(previous_end, extra):
    """A previous end that is pure noise at level e (zero data) re-noised to s: the result is white with
    variance s^2, i.e. the jump corrects the upsampled noise's correlation within each 2x2 block; at the
    minimum start and above it."""
    s = min(min_start(previous_end) + extra, 1.0)
    m = 200_000
    previous = previous_end * torch.randn(m, 1, 2, 2, generator=gen(0), dtype=torch.float64)
    xi = torch.randn(m, 1, 4, 4, generator=gen(1), dtype=torch.float64)
    start = renoise(previous, xi, previous_end=previous_end, start=s).reshape(m, 16)
    torch.testing.assert_close(covariance(start), s * s * torch.eye(16, dtype=torch.float64), rtol=0, atol=0.01 * s * s + 1e-3)
    # Without the correction (the upsampled noise scaled alone) the block is correlated: the test can fail.
    if previous_end > 0:
        naive = ((1 - s) / (1 - previous_end) * multistage.upsample(previous)).reshape(m, 16)
        assert covariance(naive)[0, 1] > 0.05 * s * s


def test_the_jump_keeps_the_coarse_data_and_refuses_to_remove_noise():
    previous = torch.randn(2, 3, 4, 4, generator=gen(0))
    xi = torch.zeros(2, 3, 8, 8)
    # With no fresh noise the start is the upsampled previous end scaled to the start's data level.
    start = renoise(previous, xi, previous_end=0.5, start=0.8)
    torch.testing.assert_close(F.avg_pool2d(start, 2), (1 - 0.8) / (1 - 0.5) * previous)
    assert min_start(0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="start must lie in"):
        renoise(previous, xi, previous_end=0.5, start=0.6)
    with pytest.raises(ValueError, match="xi must be"):
        renoise(previous, torch.zeros(2, 3, 4, 4), previous_end=0.5, start=0.8)


def test_training_stages_have_the_stated_marginals():
    """Start of stage k: mean (1 - s) Up(x^{k-1}), covariance s^2 I; end: mean (1 - e) x^k, covariance e^2 I,
    where x^k is the latent pooled to scale k; checked on 100,000 draws of the noise."""
    scales, m = (1, 2, 4), 100_000
    latent = torch.randn(1, 1, 4, 4, generator=gen(3), dtype=torch.float64)
    pyramid = [p.expand(m, -1, -1, -1) for p in area_pyramid(latent, scales)]
    stages_times = ((1.0, 0.5), (0.75, 0.3), (0.6, 0.0))
    g = gen(4)
    xis = [torch.randn(m, 1, s, s, generator=g, dtype=torch.float64) for s in scales]
    stages = training_stages(pyramid, xis, stages_times)
    for k, ((start, end), (s, e)) in enumerate(zip(stages, stages_times)):
        side = scales[k]
        coarse = torch.zeros_like(pyramid[k][:1]) if k == 0 else multistage.upsample(pyramid[k - 1][:1])
        torch.testing.assert_close(start.mean(0, keepdim=True), (1 - s) * coarse, rtol=0, atol=0.02)
        torch.testing.assert_close(end.mean(0, keepdim=True), (1 - e) * pyramid[k][:1], rtol=0, atol=0.02)
        eye = torch.eye(side * side, dtype=torch.float64)
        torch.testing.assert_close(covariance(start.reshape(m, -1)), s * s * eye, rtol=0, atol=0.02)
        torch.testing.assert_close(covariance(end.reshape(m, -1)), e * e * eye, rtol=0, atol=0.02)
        # Start and end share one noise: the segment between them is straight in the noise too.
        if e > 0:
            noise_start = (start - (1 - s) * coarse) / s
            noise_end = (end - (1 - e) * pyramid[k][:1]) / e
            torch.testing.assert_close(noise_start, noise_end, rtol=0, atol=1e-9)


def test_the_chain_of_training_stages_is_the_samplers_chain():
    """Each training start is the jump of the previous training end, the function the sampler applies."""
    scales = (1, 2, 4, 8)
    latent = torch.randn(3, 4, 8, 8, generator=gen(5))
    pyramid = area_pyramid(latent, scales)
    xis = [torch.randn(3, 4, s, s, generator=gen(6 + s)) for s in scales]
    stages = training_stages(pyramid, xis, STAGES)
    assert torch.equal(stages[0][0], xis[0])
    for k in range(1, 4):
        expected = renoise(stages[k - 1][1], xis[k], previous_end=STAGES[k - 1][1], start=STAGES[k][0])
        assert torch.equal(stages[k][0], expected)
    torch.testing.assert_close(stages[-1][1], latent)  # the last stage ends at the data


def test_stage_times_are_checked_and_named():
    assert check_stage_times([[1, 0.5], [0.8, 0]], 2) == ((1.0, 0.5), (0.8, 0.0))
    assert stages_from_ends([0.5]) == ((1.0, 0.5), (pytest.approx(2 / 3), 0.0))
    bad = [
        ([(1, 0.5)], "one \\(start, end\\) pair per scale"),
        ([(0.9, 0.5), (0.8, 0)], "must start at 1"),
        ([(1, 0.5), (0.8, 0.1)], "must end at 0"),
        ([(1, 0.5), (0.6, 0)], "below 0.666667"),
        ([(1, 0.5), (0.4, 0.6)], "stage_times\\[1\\]: span must satisfy"),
        ("1,0", "list of \\(start, end\\) pairs"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            check_stage_times(value, 2)


def test_the_model_config_names_flow_and_stage_times():
    with pytest.raises(ValueError, match="flow must be one of"):
        get_preset("flowar-tiny", flow="pyramid")
    with pytest.raises(ValueError, match="stage_times must be given"):
        get_preset("flowar-tiny", flow="multistage")
    with pytest.raises(ValueError, match="stage_times is only for flow='multistage'"):
        get_preset("flowar-tiny", stage_times=STAGES)
    with pytest.raises(ValueError, match="stage_times must hold one"):
        get_preset("flowar-tiny", flow="multistage", stage_times=STAGES[:3])
    for name in ("flowar-s", "flowar-b", "flowar-l", "flowar-h"):
        assert get_preset(name).flow == "full"  # every released preset denoises fully per scale


# ---------------------------------------------------------------------------------------------- FlowAR
@pytest.mark.parametrize("use_draws", [True, False])
def test_full_spans_give_flowars_loss_exactly(use_draws):
    """Multistage with every stage spanning [1, 0] is FlowAR: the same loss from the same randomness, whether
    the draws are handed in or made from one generator."""
    full, staged = tiny_flowar(0).train(), multistage_flowar(0, stage_times=FULL).train()
    staged.load_state_dict(full.state_dict())
    latents, labels = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.tensor([1, 5, 9])
    if use_draws:
        draws = full.draw_randomness(3, generator=gen(2))
        a, b = full(latents, labels, **draws), staged(latents, labels, **draws)
    else:
        a, b = full(latents, labels, generator=gen(2)), staged(latents, labels, generator=gen(2))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss_per_scale, b.loss_per_scale)
    # And the stages do change the loss when they are not full.
    partial = multistage_flowar(0).train()
    partial.load_state_dict(full.state_dict())
    assert not torch.equal(partial(latents, labels, generator=gen(2)).loss, a.loss)


@pytest.mark.parametrize("options", [dict(guidance_scale=3.0, steps=4), dict(guidance_scale=1.0, steps=3, solver="midpoint"),
                                     dict(solver="dopri5", atol=1e-3, rtol=1e-3)])
def test_full_spans_give_flowars_samples_exactly(options):
    full, staged = tiny_flowar(0), multistage_flowar(0, stage_times=FULL)
    staged.load_state_dict(full.state_dict())
    a = full.sample_with_stats([0, 3, 7], generator=gen(3), **options)
    b = staged.sample_with_stats([0, 3, 7], generator=gen(3), **options)
    assert torch.equal(a.latents, b.latents) and a.nfe_per_scale == b.nfe_per_scale


class OracleHead(FlowHead, torch.nn.Module):
    """The exact velocity of the multistage path towards one known latent: at time t of stage k the state is
    (data part) + t N, so N and the segment's velocity follow from x_t. Integrated by Euler on straight
    segments it must land on the latent, which tests spans, grids and jumps together."""

    def __init__(self, latent: torch.Tensor, scales, stage_times):
        super().__init__()
        self.pyramid = area_pyramid(latent, scales)
        self.scales, self.stage_times = scales, stage_times

    def forward(self, x_t, t, cond):
        k = [s * s for s in self.scales].index(x_t.shape[1])
        s, e = self.stage_times[k]
        target = self.pyramid[k].flatten(2).transpose(1, 2).to(x_t)
        coarse = (torch.zeros_like(target) if k == 0 else
                  multistage.upsample(self.pyramid[k - 1]).flatten(2).transpose(1, 2).to(x_t))
        w = ((t - e) / (s - e)).to(x_t)[:, None, None]
        data = w * (1 - s) * coarse + (1 - w) * (1 - e) * target
        noise = (x_t - data) / t.to(x_t)[:, None, None]
        return ((1 - s) * coarse - (1 - e) * target) / (s - e) + noise


@pytest.mark.parametrize("stage_times", [STAGES, stages_from_ends([0.5, 0.3, 0.15]), FULL])
def test_sampling_with_the_exact_velocity_lands_on_the_data(stage_times):
    model = multistage_flowar(0, stage_times=stage_times)
    latent = torch.randn(1, 4, 8, 8, generator=gen(7), dtype=torch.float64).expand(2, -1, -1, -1)
    model.flownet = OracleHead(latent, model.config.scales, stage_times)
    out = model.sample_with_stats([1, 2], generator=gen(8), guidance_scale=1.0, steps=3, schedule="uniform")
    torch.testing.assert_close(out.latents.double(), latent, rtol=0, atol=1e-5)
    assert out.nfe_per_scale == [3, 3, 3, 3]


def test_per_scale_steps_reach_each_scale():
    model = multistage_flowar(0)
    out = model.sample_with_stats([1, 2], generator=gen(9), steps=[4, 3, 2, 2], schedule="uniform", guidance_scale=2.0)
    assert out.nfe_per_scale == [4, 3, 2, 2]
    with pytest.raises(ValueError, match="steps must hold one count per scale \\(4"):
        model.sample([1, 2], steps=[4, 3])
    with pytest.raises(ValueError, match="steps must be >= 2 for the 'flowar' schedule"):
        model.sample([1, 2], steps=[4, 3, 1, 2])


def test_multistage_sampling_is_seeded_and_differs_from_full():
    model = multistage_flowar(0)
    a = model.sample([4, 4], generator=gen(10))
    assert torch.equal(a, model.sample([4, 4], generator=gen(10)))
    full = tiny_flowar(0)
    assert not torch.allclose(a, full.sample([4, 4], generator=gen(10)))
    # The per-sample noise of eval.sample is the model's: the same draws row by row.
    noise = model.noise_from_seeds([11, 12])
    both = model.sample([4, 4], noise=noise)
    one = model.sample([4], noise=[n[1:] for n in noise])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_a_multistage_release_round_trips_and_samples_the_same(tmp_path):
    pipe = tiny_flowar_pipeline(0, flow="multistage", stage_times=STAGES, sampling={"steps": [4, 3, 2, 2]})
    pipe.save_pretrained(tmp_path / "release")
    loaded = load_pipeline(tmp_path / "release")
    assert loaded.model.config == pipe.model.config and loaded.model.config.stage_times == STAGES
    assert loaded.model.config.sampling.steps == (4, 3, 2, 2)
    a = pipe([1, 2], output_type="latent", generator=gen(11))
    b = loaded([1, 2], output_type="latent", generator=gen(11))
    assert torch.equal(a, b)


def test_editing_and_mixed_collaboration_are_refused():
    pipe = tiny_flowar_pipeline(0, flow="multistage", stage_times=STAGES)
    images = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="editing needs a model with flow='full'"):
        inpaint(pipe, images, torch.ones(1, 1, 16, 16), 1)
    with pytest.raises(ValueError, match="flow: multistage vs full"):
        collaborative_sample(pipe.model, tiny_flowar(1), [1], draft_scales=2)


def test_a_few_training_steps_lower_the_multistage_loss():
    torch.manual_seed(0)
    model = multistage_flowar(0).train()
    latents = torch.randn(16, 4, 8, 8, generator=gen(12))
    labels = torch.arange(16) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    draws = model.draw_randomness(16, generator=gen(13))  # one fixed batch of draws: the loss must fall on it

    def loss():
        return model(latents, labels, **draws).loss

    before = float(loss())
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss()) < 0.7 * before and math.isfinite(before)
