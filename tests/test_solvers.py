"""ODE solvers, step schedules and interval classifier-free guidance."""

import math

import pytest
import torch

from heads.networks import FlowTransformerHead
from heads.solvers import SCHEDULES, SOLVERS, integrate, sample_flow, step_schedule

# dx/dt = (A + B t) x has x(0) = x(1) exp(-(A + B / 2)) when integrated from t = 1 down to 0.
# (A, B) = (0.5, 1) would be a poor choice: the 3/8-rule RK4's leading error term nearly cancels there
# and the observed order jumps around between 1.4 and 7.7.
A, B = 1.0, 1.0


def linear_field(x, t):
    return (A + B * t.view(-1, 1)) * x


def exact(x1):
    return x1 * math.exp(-(A + B / 2))


def _error(solver, steps):
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x0, _ = integrate(linear_field, x1, solver=solver, steps=steps, schedule="uniform")
    return (x0 - exact(x1)).abs().max().item()


@pytest.mark.parametrize("solver,order,steps", [("euler", 1, 16), ("midpoint", 2, 16), ("rk4", 4, 8)])
def test_fixed_step_solvers_converge_at_their_order(solver, order, steps):
    observed = math.log2(_error(solver, steps) / _error(solver, 2 * steps))
    assert abs(observed - order) < 0.3, f"{solver}: observed order {observed:.3f}"


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fixed_step_nfe(solver, per_step, schedule):
    intervals = len(step_schedule(10, schedule)) - 1
    _, nfe = integrate(linear_field, torch.ones(1, 2), solver=solver, steps=10, schedule=schedule)
    assert nfe == per_step * intervals


def test_dopri5_meets_tolerance():
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    errors = []
    for tol in (1e-4, 1e-8):
        x0, nfe = integrate(linear_field, x1, solver="dopri5", atol=tol, rtol=tol)
        errors.append((x0 - exact(x1)).abs().max().item())
        assert errors[-1] < 10 * tol
        assert nfe > 0
    assert errors[1] < errors[0]


def test_dopri5_jumps_avoid_rejected_steps_at_a_discontinuity():
    def switched(x, t):  # rate 1 above t = 0.37, rate 2 below
        return torch.where(t.view(-1, 1) <= 0.37, 2.0, 1.0).to(x.dtype) * x

    x1 = torch.ones(1, 2, dtype=torch.float64)
    target = math.exp(-(0.63 * 1.0 + 0.37 * 2.0))
    plain, nfe_plain = integrate(switched, x1, solver="dopri5", atol=1e-8, rtol=1e-8)
    jumped, nfe_jump = integrate(switched, x1, solver="dopri5", atol=1e-8, rtol=1e-8, jumps=[0.37])
    assert abs(jumped[0, 0].item() - target) < 1e-6
    assert abs(plain[0, 0].item() - target) < 1e-6
    assert nfe_jump < nfe_plain


def test_flowar_schedule_matches_release():
    grid = step_schedule(25)
    assert grid.dtype == torch.float64 and len(grid) == 25
    assert grid[0] == 1 and grid[-1] == 0
    assert torch.all(grid[1:] < grid[:-1])
    assert grid[11].item() == pytest.approx(0.3) and grid[12].item() == pytest.approx(0.25)
    gaps = grid[:-1] - grid[1:]
    assert gaps[:11].allclose(torch.full((11,), 0.7 / 11, dtype=torch.float64))
    assert gaps[12:].allclose(torch.full((12,), 0.25 / 12, dtype=torch.float64))
    assert torch.equal(step_schedule(50), torch.linspace(1, 0, 51, dtype=torch.float64))
    assert torch.equal(step_schedule(7, "uniform"), torch.linspace(1, 0, 8, dtype=torch.float64))
    assert len(step_schedule(2)) == 3  # smallest flowar grid: 1, 0.25, 0


def test_bad_arguments_raise_value_errors():
    for steps in (0, -3):
        with pytest.raises(ValueError, match="steps"):
            step_schedule(steps, "uniform")
    with pytest.raises(ValueError, match="steps"):
        step_schedule(1, "flowar")
    with pytest.raises(ValueError, match="schedule"):
        step_schedule(10, "cosine")
    with pytest.raises(ValueError, match="solver") as err:
        integrate(linear_field, torch.ones(1, 2), solver="heun")
    assert all(name in str(err.value) for name in SOLVERS)
    with pytest.raises(ValueError, match="steps"):
        integrate(linear_field, torch.ones(1, 2), steps=0)


def test_euler_on_flowar_schedule_reproduces_released_update():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 4, 2, generator=gen)

    def velocity(x, t):
        return torch.sin(3 * x) * t.view(-1, 1, 1) - x

    # The released loop: float64 state, model called in the latent dtype, x + (t_next - t_cur) d.
    grid = torch.cat([torch.linspace(1, 0.3, 12, dtype=torch.float64), torch.linspace(0.25, 0, 13, dtype=torch.float64)])
    x = x1.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        d = velocity(x.float(), torch.full((3,), t_cur.item()).float()).to(torch.float64)
        x = x + (t_next - t_cur) * d

    ours, nfe = integrate(velocity, x1, solver="euler", steps=25, schedule="flowar")
    assert ours.dtype == torch.float64 and nfe == 24
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)


def _toy_net(x, t, cond):
    """A velocity that depends on all three inputs, so guidance changes the result."""
    return torch.tanh(x) * t.view(-1, 1, 1) + cond[..., :1] - 0.5 * x


def _toy_problem(batch=2, n=4, c=3, d=5):
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(batch, n, c, generator=gen)
    cond = torch.randn(batch, n, d, generator=gen)
    null = torch.randn(batch, n, d, generator=gen)
    return noise, cond, null


def test_guidance_outside_every_step_time_equals_unguided():
    noise, cond, null = _toy_problem()
    plain = sample_flow(_toy_net, noise, cond, steps=4, schedule="uniform")
    # uniform 4 steps evaluates at 1, 0.75, 0.5, 0.25: none in [0.1, 0.2]
    skipped = sample_flow(_toy_net, noise, cond, cond_null=null, cfg=3.0, guidance_interval=(0.1, 0.2),
                          steps=4, schedule="uniform")
    assert torch.equal(plain.x, skipped.x)
    assert plain.nfe == skipped.nfe == 4
    assert plain.rows == skipped.rows == 4 * 2 * 4
    guided = sample_flow(_toy_net, noise, cond, cond_null=null, cfg=3.0, steps=4, schedule="uniform")
    assert not torch.allclose(guided.x, plain.x)


def test_doubled_batch_only_inside_interval():
    noise, cond, null = _toy_problem()
    batches = []

    def net(x, t, c):
        batches.append((round(t[0].item(), 6), x.shape[0]))
        return _toy_net(x, t, c)

    out = sample_flow(net, noise, cond, cond_null=null, cfg=2.0, guidance_interval=(0.0, 0.6),
                      steps=4, schedule="uniform")
    assert batches == [(1.0, 2), (0.75, 2), (0.5, 4), (0.25, 4)]
    assert out.nfe == 4
    assert out.rows == (2 + 2 + 4 + 4) * 4


def test_guided_euler_step_matches_hand_computation():
    noise, cond, null = _toy_problem()
    cfg = 3.5
    out = sample_flow(_toy_net, noise, cond, cond_null=null, cfg=cfg, steps=1, schedule="uniform")
    t = torch.ones(2)
    v_cond, v_null = _toy_net(noise, t, cond).double(), _toy_net(noise, t, null).double()
    expected = noise.double() + (0.0 - 1.0) * (v_null + cfg * (v_cond - v_null))
    assert out.x.dtype == noise.dtype
    torch.testing.assert_close(out.x, expected.float(), rtol=0, atol=1e-6)


def test_skipping_the_null_half_matches_released_sampler():
    """The release integrates [cond, null] everywhere and resets the null half when guidance starts."""
    torch.manual_seed(0)
    head = FlowTransformerHead(3, 64, 5, 1, variant="v2")
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    noise, cond, null = _toy_problem(n=4)
    extra = torch.randn_like(noise)  # the null half's own noise, which must not matter
    cfg, high = 4.0, 0.9

    grid = step_schedule(25)
    x = torch.cat([noise, extra]).double()
    cond2 = torch.cat([cond, null])
    with torch.no_grad():
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            inside = t_cur <= high
            inp = torch.cat([x[:2]] * 2) if inside else x
            d = head(inp.float(), torch.full((4,), t_cur.item()).float(), cond2).double()
            if inside:
                d_cond, d_null = d.chunk(2)
                d = torch.cat([d_null + cfg * (d_cond - d_null)] * 2)
            x = x + (t_next - t_cur) * d
    released = x[:2].float()

    ours = sample_flow(head, noise, cond, cond_null=null, cfg=cfg, guidance_interval=(0.0, high), steps=25)
    torch.testing.assert_close(ours.x, released, rtol=0, atol=1e-5)
    assert (ours.x - noise).abs().max() > 0.1  # the head did move the sample
    # 2 of 24 step times (1.0, 0.936) lie above 0.9 and run on the conditional half only
    assert ours.rows == (2 * 2 + 22 * 4) * 4


def test_sample_flow_with_higher_order_solvers():
    noise, cond, null = _toy_problem()
    ref = sample_flow(_toy_net, noise, cond, cond_null=null, cfg=2.0, solver="dopri5", atol=1e-8, rtol=1e-8,
                      guidance_interval=(0.2, 0.7))
    for solver, steps, tol in (("midpoint", 50, 1e-3), ("rk4", 20, 1e-3)):
        out = sample_flow(_toy_net, noise, cond, cond_null=null, cfg=2.0, solver=solver, steps=steps,
                          schedule="uniform", guidance_interval=(0.2, 0.7))
        # The guided field jumps at 0.2 and 0.7, so a fixed grid is only first order near them.
        assert (out.x - ref.x).abs().max() < 50 * tol
        assert out.nfe == {"midpoint": 2, "rk4": 4}[solver] * steps


def test_sample_flow_rejects_bad_arguments():
    noise, cond, null = _toy_problem()
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_flow(_toy_net, noise, cond, cond_null=null, cfg=2.0, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_flow(_toy_net, noise, cond, cond_null=null, cfg=2.0, guidance_interval=(0.0, 1.5))
    with pytest.raises(ValueError, match="cond_null"):
        sample_flow(_toy_net, noise, cond, cfg=2.0)
    with pytest.raises(ValueError, match="cond_null"):
        sample_flow(_toy_net, noise, cond, cond_null=null[:, :2], cfg=2.0)
    with pytest.raises(ValueError, match="cond"):
        sample_flow(_toy_net, noise, cond[:1])
    with pytest.raises(ValueError, match="noise"):
        sample_flow(_toy_net, noise[0], cond)
    with pytest.raises(ValueError, match="solver"):
        sample_flow(_toy_net, noise, cond, solver="ddim")
