"""heads.categorical: temperature, top-k, top-p, the draw, Gumbel smoothing and the CFG mix on constructed logits."""

import math

import pytest
import torch

from heads.categorical import (
    CategoricalHead,
    cfg_mix,
    draw_tokens,
    filter_logits,
    gumbel_softmax,
    sample_tokens,
    smoothing_temperature,
    top_k_filter,
    top_p_filter,
)

# The head's draw with no guidance and no filtering: what the options mean when they are off.
UNFILTERED = {"guidance": 0.0, "top_k": 0, "top_p": 0.0, "temperature": 1.0}


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(filtered: torch.Tensor) -> list[int]:
    return torch.isfinite(filtered).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, 1.9])
    assert kept(top_k_filter(logits, 3)) == [1, 3, 5]
    assert kept(top_k_filter(logits, 1)) == [1]
    # 0 and anything >= V keep everything, unchanged
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 6), logits)
    assert torch.equal(top_k_filter(logits, 900), logits)
    # kept entries keep their values
    assert torch.equal(top_k_filter(logits, 3)[[1, 3, 5]], logits[[1, 3, 5]])


def test_top_k_one_is_the_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 300, generator=g)
    ids = sample_tokens(logits, top_k=1, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (4, 50)
    assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        (0.4, [0]),  # 0.5 alone reaches 0.4
        (0.75, [0, 1]),  # 0.5 < 0.75 <= 0.5 + 0.3
        (0.85, [0, 1, 2]),  # 0.8 < 0.85 <= 0.95
        (0.99, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_minimal_nucleus(top_p, nucleus):
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(top_p_filter(logits, top_p)) == nucleus
    shuffled = torch.tensor([2, 0, 3, 1])  # the position of a token does not matter
    assert sorted(shuffled[kept(top_p_filter(logits[shuffled], top_p))].tolist()) == nucleus


def test_top_p_always_keeps_the_most_likely_token_and_off_values_keep_everything():
    logits = logits_of([0.97, 0.01, 0.01, 0.01])
    assert kept(top_p_filter(logits, 1e-6)) == [0]
    assert torch.equal(top_p_filter(logits, 0.0), logits)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_is_applied_to_what_top_k_kept():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    assert kept(filter_logits(logits, top_p=0.5)) == [0, 1]  # 0.4 < 0.5
    # after top-2 the renormalised probabilities are 4/7 and 3/7: 4/7 alone reaches 0.5
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [0]


def test_temperature_scales_the_logits_and_zero_is_greedy_without_drawing():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert sample_tokens(logits, temperature=0.0, generator=g).tolist() == [1, 0]
    assert torch.equal(g.get_state(), state)  # no randomness consumed


def test_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -0.5])
    n = 20000
    ids = sample_tokens(logits.expand(n, 4), temperature=1.7, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / n
    torch.testing.assert_close(freq, (logits / 1.7).softmax(-1), atol=0.015, rtol=0)


def test_filtered_tokens_are_never_drawn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 40, generator=g)
    ids = sample_tokens(logits, top_k=3, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == ids[:, None]).any(-1).all()


def test_inverse_cdf_draws_follow_the_probabilities_and_skip_filtered_tokens():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    logits = probs.log()  # -inf where a filter removed the token
    n = 20000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))
    ids = draw_tokens(logits.expand(n, 6), uniforms=uniforms)
    freq = torch.bincount(ids, minlength=6).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # The edges: u = 0 gives the first kept token; u just below 1 the last kept one, never a removed one.
    edges = draw_tokens(logits.expand(2, 6), uniforms=torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64))
    assert edges.tolist() == [1, 4]
    # Each uniform maps to the token whose cumulative interval holds it.
    assert draw_tokens(logits.expand(3, 6), uniforms=torch.tensor([0.19, 0.21, 0.71])).tolist() == [1, 3, 4]


def test_inverse_cdf_rows_do_not_depend_on_the_batch():
    logits = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(0))
    uniforms = torch.rand(5, 7, generator=torch.Generator().manual_seed(1))
    batch = draw_tokens(logits, uniforms=uniforms)
    for row in range(5):
        assert torch.equal(draw_tokens(logits[row:row + 1], uniforms=uniforms[row:row + 1])[0], batch[row])
    with pytest.raises(ValueError, match="uniforms must have shape"):
        draw_tokens(logits, uniforms=uniforms[:, :3])


def test_the_draw_consumes_the_generator_like_one_multinomial_call():
    """VAR draws with torch.multinomial on the flattened (N, V) probabilities; so do we, so equal seeds give equal ids."""
    logits = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0))
    ours = sample_tokens(logits, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(42))
    filtered = filter_logits(logits, top_k=10, top_p=0.9)
    theirs = torch.multinomial(filtered.softmax(-1).view(-1, 64), 1, replacement=True,
                               generator=torch.Generator().manual_seed(42)).view(3, 7)
    assert torch.equal(ours, theirs)
    assert torch.equal(draw_tokens(filtered, generator=torch.Generator().manual_seed(42)), theirs)


def test_gumbel_softmax_is_a_distribution_and_sharp_at_low_temperature():
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    soft = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(soft.sum(-1), torch.ones(5))
    again = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(soft, again)
    sharp = gumbel_softmax(logits, 1e-3, generator=torch.Generator().manual_seed(1))
    assert (sharp.max(-1).values > 0.999).all()
    # the sharp argmax is the Gumbel-max draw with the same noise
    noise = -torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(1)).log()
    assert torch.equal(sharp.argmax(-1), (logits + noise).argmax(-1))
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(logits, 0.0)


def test_cfg_mix():
    cond, uncond = torch.tensor([1.0, 2.0, -math.inf]), torch.tensor([0.5, -math.inf, 1.0])
    assert cfg_mix(cond, uncond, 0.0) is cond  # t = 0 is exactly the conditional logits
    finite_u = torch.tensor([0.5, 1.0, 1.0])
    torch.testing.assert_close(cfg_mix(cond[:2], finite_u[:2], 1.5), 2.5 * cond[:2] - 1.5 * finite_u[:2])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_tokens(torch.zeros(2, 5), **kwargs)


def test_smoothing_temperature_follows_var():
    """VAR's Gumbel temperature: max(0.27 (1 - 0.95 ratio), 0.005) at progress ratio k / (K - 1)."""
    assert smoothing_temperature(0.0) == pytest.approx(0.27)
    assert smoothing_temperature(0.5) == pytest.approx(0.27 * 0.525)
    assert smoothing_temperature(1.0) == pytest.approx(0.0135)
    assert smoothing_temperature(1.1) == pytest.approx(0.005)  # the floor (0.27 * -0.045 < 0.005)


def head_and_logits(seed=0):
    torch.manual_seed(seed)
    head = CategoricalHead(8, 16)
    g = torch.Generator().manual_seed(seed + 1)
    return head, torch.randn(2, 5, 16, generator=g) * 3, torch.randn(2, 5, 16, generator=g) * 3


def test_categorical_head_is_a_linear_layer_with_the_cross_entropy_loss():
    head, logits, _ = head_and_logits()
    assert isinstance(head, torch.nn.Linear) and set(head.state_dict()) == {"weight", "bias"}
    targets = torch.randint(16, (2, 5), generator=torch.Generator().manual_seed(0))
    loss = head.loss(logits.half(), targets)
    assert loss.shape == (2, 5) and loss.dtype == torch.float32
    expected = -logits.half().float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(loss, expected)


def test_categorical_head_sample_guides_filters_and_draws_like_var():
    """(1 + t) cond - t uncond, then top-k / top-p, then one multinomial over the flattened positions."""
    head, cond, uncond = head_and_logits()
    t = 1.5
    out = head.sample(cond, uncond, guidance=t, top_k=6, top_p=0.8, temperature=1.0,
                      generator=torch.Generator().manual_seed(7))
    mixed = 2.5 * cond - 1.5 * uncond
    theirs = torch.multinomial(filter_logits(mixed, top_k=6, top_p=0.8).softmax(-1).view(-1, 16), 1,
                               replacement=True, generator=torch.Generator().manual_seed(7)).view(2, 5)
    assert torch.equal(out.ids, theirs) and out.weights is None
    # guidance 0 (or no null logits) is the conditional logits alone
    plain = head.sample(cond, generator=torch.Generator().manual_seed(7), **UNFILTERED)
    zero = head.sample(cond, uncond, generator=torch.Generator().manual_seed(7), **UNFILTERED)
    assert torch.equal(plain.ids, zero.ids)
    assert torch.equal(plain.ids, sample_tokens(cond, generator=torch.Generator().manual_seed(7)))
    # uniforms replace the generator: the inverse-CDF draw of draw_tokens
    u = torch.rand(2, 5, generator=torch.Generator().manual_seed(3))
    by_u = head.sample(cond, uncond, uniforms=u, **{**UNFILTERED, "guidance": t})
    assert torch.equal(by_u.ids, draw_tokens(mixed, uniforms=u))
    greedy = head.sample(cond, uncond, **{**UNFILTERED, "guidance": t, "temperature": 0.0})
    assert torch.equal(greedy.ids, mixed.argmax(-1))


def test_categorical_head_smooth_weights_are_gumbel_softmax_of_the_sharpened_logits():
    head, cond, _ = head_and_logits()
    ratio = 0.5
    out = head.sample(cond, smooth_ratio=ratio, generator=torch.Generator().manual_seed(2),
                      **{**UNFILTERED, "top_k": 6})
    g = torch.Generator().manual_seed(2)  # the id draw first, then the Gumbel noise, from one generator
    filtered = filter_logits(cond, top_k=6)
    ids = torch.multinomial(filtered.softmax(-1).view(-1, 16), 1, replacement=True, generator=g).view(2, 5)
    noise = -torch.empty_like(filtered).exponential_(generator=g).log()
    weights = ((filtered * (1 + ratio) + noise) / (0.27 * (1 - 0.95 * ratio))).softmax(-1)
    assert torch.equal(out.ids, ids)
    torch.testing.assert_close(out.weights, weights)
    assert (out.weights[~torch.isfinite(filtered)] == 0).all()  # filtered-out codes get no weight
