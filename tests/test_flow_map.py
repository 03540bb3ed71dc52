"""Flow-map heads and the MeanFlow objective (heads.meanflow): the maths against closed forms on Gaussian data, the
jvp against finite differences, released heads loaded into flow-map heads bit for bit, and training."""

import pytest
import torch

from heads.meanflow import (MEANFLOW_LOGIT_MEAN, MEANFLOW_LOGIT_STD, MEANFLOW_SHARE_EQUAL, draw_flow_map_times,
                            flow_map_loss, mean_flow_target)
from heads.networks import FlowTransformerHead, MLPHead, build_head

F64 = torch.float64

# torch.func's forward-mode AD scripts its decompositions on first use, which warns in torch itself.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _randomise(module, std=0.05, seed=0):
    """Overwrite every parameter (no zero left: the zero-initialised layers would hide the network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            value = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
            p.copy_(value.masked_fill(value == 0, std))  # among FlowAR-S's 42M draws a few are exactly 0
    return module


# ------------------------------------------------------------------ Gaussian data: everything in closed form
# x ~ N(mu, sigma^2 I), eps ~ N(0, I), x_t = (1 - t) x + t eps ~ N(m_t, s_t^2 I) with m_t = (1 - t) mu and
# s_t^2 = (1 - t)^2 sigma^2 + t^2. The flow keeps each coordinate's standard score: x_r = m_r + (s_r / s_t)(x_t - m_t).
MU = torch.tensor([1.5, -1.0, 0.25], dtype=F64)
SIGMA = 0.5


def _col(time, x):
    return time.reshape(-1, *([1] * (x.ndim - 1)))


def _mean_std(t):
    return (1 - t) * MU, torch.sqrt((1 - t) ** 2 * SIGMA ** 2 + t ** 2)


def marginal_velocity(x, t):
    """E[eps - x | x_t] = d/dt of the flow: -mu + (s_t' / s_t)(x_t - m_t), s_t s_t' = t - (1 - t) sigma^2."""
    m_t, s_t = _mean_std(_col(t, x))
    tc = _col(t, x)
    return -MU + (tc - (1 - tc) * SIGMA ** 2) / s_t ** 2 * (x - m_t)


def exact_average_velocity(x, t, r):
    """u*(x_t, r, t) = (x_t - x_r) / (t - r), written without the division so that it is smooth through r = t:
    x_t - x_r = -(t - r) mu + (1 - s_r / s_t)(x_t - m_t) and s_t - s_r = (t - r)((t + r) - sigma^2 (2 - t - r)) / (s_t + s_r)."""
    tc, rc = _col(t, x), _col(r, x)
    m_t, s_t = _mean_std(tc)
    _, s_r = _mean_std(rc)
    return -MU + ((tc + rc) - SIGMA ** 2 * (2 - tc - rc)) / ((s_t + s_r) * s_t) * (x - m_t)


def _exact_map(x, t, r):
    m_t, s_t = _mean_std(_col(t, x))
    m_r, s_r = _mean_std(_col(r, x))
    return m_r + s_r / s_t * (x - m_t)


PAIRS = [(0.3, 0.3), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.2, 0.7), (0.0, 0.4), (0.9, 0.95), (0.0, 0.0)]


def test_exact_average_velocity_is_the_flow_map_and_the_velocity_at_r_equal_t():
    """The closed form itself: its jump is the affine flow map, and at r = t it is the marginal velocity."""
    r, t = (torch.tensor(v, dtype=F64) for v in zip(*PAIRS))
    x = torch.randn(len(PAIRS), 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    jump = x - _col(t - r, x) * exact_average_velocity(x, t, r)
    torch.testing.assert_close(jump, _exact_map(x, t, r), rtol=0, atol=1e-13)
    torch.testing.assert_close(exact_average_velocity(x, t, t), marginal_velocity(x, t), rtol=0, atol=1e-13)


def test_mean_flow_target_of_the_exact_average_velocity_is_itself():
    """The MeanFlow identity u = v - (t - r) du/dt holds for u* with the marginal v, at every (r, t) pair (r = t,
    t = 1 among them): the target mean_flow_target computes from u* by its jvp is u* to float64 precision."""
    r, t = (torch.tensor(v, dtype=F64) for v in zip(*PAIRS))
    x_t = torch.randn(len(PAIRS), 5, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 1.5
    u, u_tgt = mean_flow_target(exact_average_velocity, x_t, r, t, marginal_velocity(x_t, t))
    assert torch.equal(u, exact_average_velocity(x_t, t, r))
    assert not u_tgt.requires_grad
    torch.testing.assert_close(u_tgt, u, rtol=0, atol=1e-12)
    # And the identity discriminates: the instantaneous velocity is no average velocity where r < t.
    inst = lambda x, t_, r_: marginal_velocity(x, t_)  # noqa: E731
    _, wrong = mean_flow_target(inst, x_t, r, t, marginal_velocity(x_t, t))
    gap = (wrong - marginal_velocity(x_t, t)).abs().amax(dim=(1, 2))
    assert torch.all(gap[r < t] > 1e-2) and torch.all(gap[r == t] == 0)


def test_one_jump_from_noise_with_the_exact_average_velocity_lands_on_the_data_distribution():
    """x_0 = eps - u*(eps, 0, 1) is mu + sigma eps exactly: N(mu, sigma^2), in one evaluation."""
    eps = torch.randn(64, 4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ones, zeros = torch.ones(64, dtype=F64), torch.zeros(64, dtype=F64)
    x0 = eps - exact_average_velocity(eps, ones, zeros)
    torch.testing.assert_close(x0, MU + SIGMA * eps, rtol=0, atol=1e-13)


# ------------------------------------------------------------------ the jvp against finite differences
@pytest.mark.parametrize("kind", ["mlp", "transformer-v1", "transformer-v2"])
def test_jvp_total_derivative_matches_finite_differences(kind):
    """du/dt = v . d_x u + d_t u, read off the target as (v - u_tgt) / (t - r), against the central difference of
    h -> u(x_t + h v, r, t + h) on a random flow-map head in float64 (attention through the jvp included). The
    derivative is linear in the tangent v, so its two parts are checked apart too: the x part, the difference of the
    targets for 2v and v, against a difference in x alone, and the t part, the target for v = 0, against one in t."""
    quantize = {} if kind == "mlp" else {"quantize_time": False}
    head = _randomise(build_head(kind, token_dim=4, width=64, cond_dim=8, depth=1, flow_map=True, **quantize).double(),
                      std=0.1)
    gen = torch.Generator().manual_seed(3)
    x, v = (torch.randn(2, 4, 4, generator=gen, dtype=F64) for _ in range(2))
    cond = torch.randn(2, 4, 8, generator=gen, dtype=F64)
    r, t = torch.tensor([0.2, 0.1], dtype=F64), torch.tensor([0.6, 0.35], dtype=F64)
    velocity = head.conditioned(cond)

    def derivative(tangent):
        u, u_tgt = mean_flow_target(velocity, x, r, t, tangent)
        with torch.no_grad():
            assert torch.equal(u, velocity(x, t, r))
        return (tangent - u_tgt) / _col(t - r, x)

    def central(dx, dt, h):
        with torch.no_grad():
            return (velocity(x + h * dx, t + h * dt, r) - velocity(x - h * dx, t - h * dt, r)) / (2 * h)

    total, along_x, along_t = derivative(v), derivative(2 * v) - derivative(v), derivative(torch.zeros_like(v))
    # In t, h balances the truncation error (the time embeddings' sinusoids of 1000 t vary fast) against the
    # rounding of those sinusoids, which are float32: what is left is about 5e-4 of the largest derivative.
    h = 3e-5
    assert (central(v, 1.0, h) - total).abs().max() < 5e-3 * total.abs().max()
    assert (central(0 * v, 1.0, h) - along_t).abs().max() < 5e-3 * along_t.abs().max()
    # In x the MLP head is float64 throughout; the transformers' RMSNorm computes in float32.
    h, tol = (1e-4, 1e-6) if kind == "mlp" else (1e-3, 1e-3)
    assert (central(v, 0.0, h) - along_x).abs().max() < tol * along_x.abs().max()
    assert along_x.abs().max() > 1e-2


# ------------------------------------------------------------------ released heads in flow-map heads
def _released_inputs(side, cond_dim, seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, side * side, 16, generator=gen)
    cond = torch.randn(2, side * side, cond_dim, generator=gen)
    t = torch.tensor([0.73, 0.2])
    r = torch.tensor([0.1, 0.05])
    return x, t, cond, r


@pytest.mark.parametrize("kind, width, cond_dim", [("transformer-v1", 1024, 768), ("transformer-v2", 128, 96)])
def test_released_head_loads_into_a_flow_map_head_and_gives_its_velocity_bit_for_bit(kind, width, cond_dim, one_thread):
    """FlowAR-S's layout (v1, full width) and a small v2: every ordinary key loads strictly, interval_embed is the
    only addition, and the flow-map head's output equals the ordinary head's at r = None, at r = t and at any r."""
    head = _randomise(build_head(kind, token_dim=16, width=width, cond_dim=cond_dim, depth=2)).eval()
    assert all(torch.count_nonzero(p) == p.numel() for p in head.parameters())
    state = head.state_dict()
    fm = build_head(kind, token_dim=16, width=width, cond_dim=cond_dim, depth=2, flow_map=True).eval()
    assert fm.load_velocity_state(state) is fm
    extra = set(fm.state_dict()) - set(state)
    assert set(state) <= set(fm.state_dict()) and extra and all(k.startswith("interval_embed.") for k in extra)
    x, t, cond, r = _released_inputs(4, cond_dim)
    with torch.no_grad():
        v = head(x, t, cond)
        assert v.abs().mean() > 1e-3
        assert torch.equal(fm(x, t, cond), v)
        assert torch.equal(fm(x, t, cond, r=t), v)
        assert torch.equal(fm(x, t, cond, r=r), v)
        velocity = fm.conditioned(cond)
        assert torch.equal(velocity(x, t), v) and torch.equal(velocity(x, t, t), v) and torch.equal(velocity(x, t, r), v)


def test_load_velocity_state_is_strict_and_restarts_the_flow_map_at_the_velocity():
    head = _randomise(MLPHead(4, 64, 8, 2))
    fm = _randomise(MLPHead(4, 64, 8, 2, flow_map=True), seed=1)  # a trained-looking interval embedding
    state = head.state_dict()
    fm.load_velocity_state(state)
    assert torch.count_nonzero(fm.interval_embed.mlp[2].weight) == 0
    x, t, cond, r = torch.randn(2, 3, 4), torch.tensor([0.9, 0.4]), torch.randn(2, 3, 8), torch.tensor([0.0, 0.3])
    with torch.no_grad():
        assert torch.equal(fm(x, t, cond, r=r), head(x, t, cond))
    with pytest.raises(ValueError, match="missing.*input_proj.weight"):
        fm.load_velocity_state({k: w for k, w in state.items() if k != "input_proj.weight"})
    with pytest.raises(ValueError, match="unexpected.*stray"):
        fm.load_velocity_state({**state, "stray": torch.zeros(1)})
    with pytest.raises(ValueError, match="flow-map head's state dict"):
        fm.load_velocity_state(fm.state_dict())


def test_fresh_flow_map_heads_add_only_a_zero_output_interval_embedding():
    for kind in ("transformer-v1", "transformer-v2", "mlp"):
        plain = build_head(kind, token_dim=4, width=64, cond_dim=8, depth=1)
        fm = build_head(kind, token_dim=4, width=64, cond_dim=8, depth=1, flow_map=True)
        assert set(fm.state_dict()) == set(plain.state_dict()) | {f"interval_embed.mlp.{i}.{p}" for i in (0, 2)
                                                                  for p in ("weight", "bias")}
        assert not hasattr(plain, "interval_embed") and not plain.flow_map and fm.flow_map
        last = fm.interval_embed.mlp[2]
        assert torch.count_nonzero(last.weight) == torch.count_nonzero(last.bias) == 0
        assert torch.count_nonzero(fm.interval_embed.mlp[0].weight) > 0
        assert not fm.interval_embed.quantize
    assert build_head("transformer-v1", token_dim=4, width=64, cond_dim=8, depth=1).time_embed.quantize
    assert not build_head("transformer-v2", token_dim=4, width=64, cond_dim=8, depth=1,
                          quantize_time=False).time_embed.quantize
    with pytest.raises(ValueError, match="quantize_time"):
        build_head("mlp", token_dim=4, width=64, cond_dim=8, depth=1, quantize_time=True)


@pytest.mark.parametrize("kind", ["transformer-v1", "transformer-v2", "mlp"])
def test_an_ordinary_head_refuses_r(kind):
    head = build_head(kind, token_dim=4, width=64, cond_dim=8, depth=1)
    x, t, cond = torch.randn(2, 4, 4), torch.rand(2), torch.randn(2, 4, 8)
    for call in (lambda: head(x, t, cond, r=t / 2), lambda: head.conditioned(cond)(x, t, t / 2),
                 lambda: head.flow_map_loss(x, cond, r=t / 2, t=t, noise=x)):
        with pytest.raises(ValueError, match=r"r was given.*instantaneous velocity.*flow_map=True"):
            call()
    fm = build_head(kind, token_dim=4, width=64, cond_dim=8, depth=1, flow_map=True)
    with pytest.raises(ValueError, match=r"r must have the shape of t"):
        fm(x, t, cond, r=t[:1])


def test_flow_map_training_moves_the_output_off_the_velocity():
    """One optimiser step on flow_map_loss gives interval_embed's zero last layer weights, and the flow map then
    differs from the velocity it started as where r < t."""
    head = _randomise(FlowTransformerHead(4, 64, 8, 1, variant="v1", quantize_time=False))
    fm = FlowTransformerHead(4, 64, 8, 1, variant="v1", flow_map=True, quantize_time=False)
    fm.load_velocity_state(head.state_dict())
    gen = torch.Generator().manual_seed(5)
    x, noise = torch.randn(2, 4, 4, generator=gen), torch.randn(2, 4, 4, generator=gen)
    cond = torch.randn(2, 4, 8, generator=gen)
    r, t = torch.tensor([0.1, 0.3]), torch.tensor([0.8, 0.6])
    loss = fm.flow_map_loss(x, cond, r=r, t=t, noise=noise)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, flow_map_loss(fm.conditioned(cond), x, noise, r, t), rtol=0, atol=0)
    opt = torch.optim.SGD(fm.parameters(), lr=1e-3)
    loss.mean().backward()
    opt.step()
    assert torch.count_nonzero(fm.interval_embed.mlp[2].weight) > 0
    with torch.no_grad():
        assert not torch.equal(fm(x, t, cond, r=r), head(x, t, cond))


def test_flow_map_loss_at_r_equal_t_is_the_flow_matching_loss():
    from heads.path import flow_matching_loss

    head = _randomise(MLPHead(4, 64, 8, 2, flow_map=True))
    gen = torch.Generator().manual_seed(6)
    x, noise, cond = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 8, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9])
    torch.testing.assert_close(flow_map_loss(head.conditioned(cond), x, noise, t, t),
                               flow_matching_loss(head, x, cond, t=t, noise=noise), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="noise"):
        flow_map_loss(head.conditioned(cond), x, noise[:, :2], t, t)
    with pytest.raises(ValueError, match="r must have shape"):
        flow_map_loss(head.conditioned(cond), x, noise, t[:2], t)


def test_draw_flow_map_times():
    gen = torch.Generator().manual_seed(7)
    r, t = draw_flow_map_times(20000, generator=gen, share_equal=MEANFLOW_SHARE_EQUAL, logit_mean=MEANFLOW_LOGIT_MEAN,
                               logit_std=MEANFLOW_LOGIT_STD)
    assert r.shape == t.shape == (20000,) and r.dtype == torch.float32
    assert torch.all(r <= t) and torch.all(r > 0) and torch.all(t < 1)
    equal = (r == t).double().mean().item()
    assert abs(equal - MEANFLOW_SHARE_EQUAL) < 4 * (0.75 * 0.25 / 20000) ** 0.5
    # t is the larger of two logit-normals: P(t < 1/2) = P(both logits < 0) = Phi(0.4)^2 for mean -0.4, std 1.
    phi = 0.5 * (1 + torch.erf(torch.tensor(0.4 / 2 ** 0.5))).item()
    assert abs((t < 0.5).double().mean().item() - phi ** 2) < 0.015
    again = draw_flow_map_times(20000, generator=torch.Generator().manual_seed(7), share_equal=MEANFLOW_SHARE_EQUAL,
                                logit_mean=MEANFLOW_LOGIT_MEAN, logit_std=MEANFLOW_LOGIT_STD)
    assert torch.equal(again[0], r) and torch.equal(again[1], t)
    for bad in ({"share_equal": 1.5}, {"logit_std": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            draw_flow_map_times(4, **{"share_equal": 0.5, "logit_mean": 0.0, "logit_std": 1.0, **bad})
    assert (MEANFLOW_SHARE_EQUAL, MEANFLOW_LOGIT_MEAN, MEANFLOW_LOGIT_STD) == (0.75, -0.4, 1.0)


def test_flow_map_head_compiles_without_a_recompile_per_interval():
    """The interval reaches the compiled step as a tensor: new values of r reuse the graph and give eager's output."""
    head = _randomise(FlowTransformerHead(4, 64, 8, 1, variant="v2", flow_map=True, quantize_time=False)).eval()
    x, cond = torch.randn(2, 4, 4), torch.randn(2, 4, 8)
    t = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        eager = [head(x, t, cond, r=t * f) for f in (0.0, 0.5, 0.25)]
    torch._dynamo.reset()
    frames = []
    head.compile(backend=lambda gm, inputs: frames.append(gm) or gm.forward)
    with torch.no_grad():
        compiled = [head(x, t, cond, r=t * f) for f in (0.0, 0.5, 0.25)]
    torch._dynamo.reset()
    assert len(frames) == 1
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_a_few_steps_of_the_mean_flow_loss_improve_the_one_step_sample(one_thread):
    """Gaussian toy: 60 Adam steps of the MeanFlow loss bring the one-jump sample (t = 1 -> r = 0) of a tiny flow-map
    MLP head closer to N(mu, sigma^2) in mean and std than the untrained head's (which jumps to the noise itself)."""
    torch.manual_seed(0)
    mu, sigma = MU.float()[:2], SIGMA
    head = MLPHead(2, 64, 1, 2, flow_map=True)
    eps = torch.randn(4096, 1, 2, generator=torch.Generator().manual_seed(8))

    def errors():
        with torch.no_grad():
            x0 = eps - head(eps, torch.ones(4096), torch.zeros(4096, 1, 1), r=torch.zeros(4096))
        return (x0.mean((0, 1)) - mu).abs().max().item(), (x0.std((0, 1)) - sigma).abs().max().item()

    before = errors()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(9)
    for _ in range(60):
        x = mu + sigma * torch.randn(256, 1, 2, generator=gen)
        noise = torch.randn(256, 1, 2, generator=gen)
        r, t = draw_flow_map_times(256, generator=gen, share_equal=MEANFLOW_SHARE_EQUAL,
                                   logit_mean=MEANFLOW_LOGIT_MEAN, logit_std=MEANFLOW_LOGIT_STD)
        loss = head.flow_map_loss(x, torch.zeros(256, 1, 1), r=r, t=t, noise=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = errors()
    # Untrained: mean off by |mu| = 1.5, std off by 1 - sigma (4096 samples: about 0.01 of noise).
    assert before[0] > 1.4 and before[1] > 0.4
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1]
