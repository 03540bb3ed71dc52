"""The path x_t = (1 - t) x + t eps and the flow-matching loss."""

import pytest
import torch

from heads.flow import sample_flow
from heads.path import flow_matching_loss, interpolate, velocity_target

from flow_options import solve


def test_interpolate_endpoints_and_broadcast():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    t = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    x_t = interpolate(x, eps, t)
    assert torch.equal(x_t[0], x[0])  # t = 0 is data
    assert torch.equal(x_t[1], eps[1])  # t = 1 is noise
    torch.testing.assert_close(x_t[2], 0.75 * x[2] + 0.25 * eps[2])


def test_velocity_target_is_time_derivative_of_path():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    t, h = torch.full((2,), 0.4, dtype=torch.float64), 1e-6
    finite_diff = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(finite_diff, velocity_target(x, eps), rtol=1e-6, atol=1e-8)


def test_interpolate_rejects_bad_time_shape():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="t must have shape"):
        interpolate(x, x, torch.rand(3))


def _point_mass_oracle(x_star):
    """Exact velocity when all data sits at x_star: v(x_t, t) = (x_t - x_star) / t."""

    def net(x_t, t, cond):
        return (x_t - x_star) / t.view(-1, 1, 1)

    return net


def test_loss_is_zero_for_oracle_and_not_for_wrong_net():
    gen = torch.Generator().manual_seed(0)
    x_star = torch.randn(1, 6, 4, dtype=torch.float64, generator=gen)
    x = x_star.expand(8, -1, -1).clone()
    cond = torch.zeros(8, 6, 2, dtype=torch.float64)
    # t away from 0, where the oracle divides by t
    t = torch.rand(8, dtype=torch.float64, generator=gen) * 0.9 + 0.1
    noise = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    loss = flow_matching_loss(_point_mass_oracle(x_star), x, cond, t=t, noise=noise)
    assert loss.shape == (8,)
    assert loss.max() < 1e-20

    zero = flow_matching_loss(lambda x_t, t, c: torch.zeros_like(x_t), x, cond, t=t, noise=noise)
    assert zero.min() > 0.1  # E ||eps - x||^2 / dim is about 1 + |x|^2 here


def test_loss_matches_hand_computation_and_passes_time_to_net():
    x = torch.randn(4, 9, 3)
    cond = torch.randn(4, 9, 5)
    t = torch.tensor([0.1, 0.5, 0.7, 0.9])
    noise = torch.randn_like(x)
    seen = {}

    def net(x_t, tt, c):
        seen["t"], seen["x_t"], seen["c"] = tt, x_t, c
        return 2.0 * x_t

    loss = flow_matching_loss(net, x, cond, t=t, noise=noise)
    x_t = (1 - t.view(-1, 1, 1)) * x + t.view(-1, 1, 1) * noise
    expected = ((2.0 * x_t - (noise - x)) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(loss, expected)
    assert seen["t"].shape == (4,) and seen["t"].dtype == x.dtype
    assert seen["c"] is cond
    torch.testing.assert_close(seen["x_t"], x_t)


def test_loss_rejects_noise_of_wrong_shape():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="noise"):
        flow_matching_loss(lambda *a: a[0], x, x, t=torch.rand(2), noise=torch.randn(2, 4, 2))


def test_known_tokens_ride_the_straight_path_during_a_solve():
    """Replacement sampling (heads.flow.KnownRegionNet): the head sees the known tokens at (1 - t) target
    + t noise at every time, and the solve returns exactly the target there."""
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen)
    target = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen)
    cond = torch.randn(2, 6, 5, dtype=torch.float64, generator=gen)
    keep = torch.zeros(2, 6, 1, dtype=torch.bool)
    keep[0, :2] = keep[1, 4:] = True
    seen = []

    def net(x_t, t, c):  # tokens interact (a mean over the map), so the unknown ones feel the known ones
        seen.append((x_t.clone(), t.clone()))
        return torch.tanh(x_t + x_t.mean(1, keepdim=True)) + c[..., :3]

    out = sample_flow(net, noise, cond, solve(steps=5, schedule="uniform"), known=(keep, target))
    assert torch.equal(out.x[keep.expand_as(out.x)], target[keep.expand_as(target)])
    for x_t, t in seen:
        on_path = (1 - t.view(-1, 1, 1)) * target + t.view(-1, 1, 1) * noise
        torch.testing.assert_close(x_t[keep.expand_as(x_t)], on_path[keep.expand_as(on_path)], rtol=0, atol=1e-12)
    free = sample_flow(net, noise, cond, solve(steps=5, schedule="uniform"))
    assert (free.x - out.x)[~keep.expand_as(out.x)].abs().max() > 1e-3  # the known tokens steer the others
    with pytest.raises(ValueError, match="keep"):
        sample_flow(net, noise, cond, solve(), known=(keep.float(), target))
