"""FlowAR model: mask, attention, sampling with and without the KV cache, guidance, errors."""

import pytest
import torch
import torch.nn.functional as F

from flowar import FlowAR, get_preset
from flowar.attention import block_causal_attention, block_causal_mask, scale_segments
from flowar.model import from_tokens, to_tokens
from heads import FlowHead, sample_flow
from vae.pyramid import next_scale_input

from flow_options import solve


def tiny(**overrides):
    torch.manual_seed(0)
    return FlowAR(get_preset("flowar-tiny", **overrides)).eval()


def test_block_causal_mask_values():
    mask = block_causal_mask((1, 2, 4))
    assert mask.shape == (21, 21) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] + [False] * 20  # the class token sees only itself
    for row in range(1, 5):  # the 2x2 scale sees the class token and the whole 2x2 scale
        assert mask[row].tolist() == [True] * 5 + [False] * 16
    assert mask[5:].all()  # the last scale sees everything
    assert mask.sum() == 1 * 1 + 4 * 5 + 16 * 21


def test_segment_attention_equals_masked_sdpa():
    torch.manual_seed(0)
    scales = (1, 2, 4, 8)
    length = sum(s * s for s in scales)
    q, k, v = torch.randn(3, 2, 3, length, 8).unbind(0)
    ours = block_causal_attention(q, k, v, scale_segments(scales))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(scales))
    torch.testing.assert_close(ours, masked, rtol=1e-5, atol=1e-6)
    # and it is really causal across scales: changing the last scale's keys leaves earlier rows alone
    k2 = k.clone()
    k2[:, :, 21:] += 1.0
    changed = block_causal_attention(q, k2, v, scale_segments(scales))
    torch.testing.assert_close(changed[:, :, :21], ours[:, :, :21])
    assert not torch.allclose(changed[:, :, 21:], ours[:, :, 21:])


def _sample_without_cache(model, labels, noise, *, steps):
    """Recompute the whole prefix at every scale with block-causal attention (no KV cache, no cfg)."""
    c = model.config
    class_embedding = model.class_emb(labels)
    tokens = class_embedding[:, None]
    for k, side in enumerate(c.scales):
        z = model.transformer(tokens, class_embedding, sides=c.scales[: k + 1])
        start, end = scale_segments(c.scales)[k]
        x = sample_flow(model.flownet, noise[k], z[:, start:end], solve(steps=steps)).x.float()
        if k + 1 < len(c.scales):
            nxt = next_scale_input(from_tokens(x, side), full_side=c.scales[-1], next_side=c.scales[k + 1])
            tokens = torch.cat([tokens, model.z_proj(to_tokens(nxt))], dim=1)
    return from_tokens(x, c.scales[-1])


def _noise(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, s * s, model.config.token_dim, generator=g) for s in model.config.scales]


def test_kv_cache_sampling_equals_full_recompute():
    model = tiny()
    labels = torch.tensor([1, 7, 3])
    noise = _noise(model, 3)
    with torch.no_grad():
        cached = model.sample(labels, guidance_scale=1.0, steps=4, noise=noise)
        recomputed = _sample_without_cache(model, labels, noise, steps=4)
    assert cached.shape == (3, 4, 8, 8)
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


def test_same_generator_same_samples_and_different_seed_differs():
    model = tiny()
    a = model.sample([2, 5], guidance_scale=3.0, steps=3, generator=torch.Generator().manual_seed(11))
    b = model.sample([2, 5], guidance_scale=3.0, steps=3, generator=torch.Generator().manual_seed(11))
    c = model.sample([2, 5], guidance_scale=3.0, steps=3, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_one_equals_unguided_path_and_guidance_changes_samples():
    model = tiny()
    noise = _noise(model, 2)
    plain = model.sample_with_stats([4, 9], guidance_scale=1.0, steps=4, noise=noise)
    # guidance_scale=3 whose interval contains no step time: the null half is carried but never used
    never = model.sample_with_stats([4, 9], guidance_scale=3.0, cfg_schedule="constant",
                                    guidance_interval=(0.0, 0.0), steps=4, noise=noise)
    # equal up to float32 rounding: the transformer runs 2B rows instead of B, so its matmuls block differently
    torch.testing.assert_close(plain.latents, never.latents, rtol=1e-4, atol=1e-4)
    assert plain.head_rows == never.head_rows  # the head ran on the conditional half only
    guided = model.sample_with_stats([4, 9], guidance_scale=3.0, cfg_schedule="constant",
                                     guidance_interval=(0.0, 1.0), steps=4, noise=noise)
    assert not torch.allclose(plain.latents, guided.latents, atol=1e-4)
    assert guided.head_rows == 2 * plain.head_rows
    assert guided.nfe == plain.nfe == 4 * len(model.config.scales)


def test_linear_cfg_schedule_skips_guidance_at_the_first_scale():
    model = tiny()
    out = model.sample_with_stats([1], guidance_scale=4.0, steps=4, guidance_interval=(0.0, 1.0))
    unguided_rows = sum(s * s for s in model.config.scales) * 4
    first = model.config.scales[0] ** 2 * 4
    # linear ramp: cfg is exactly 1 at the first scale, so only that scale evaluates a single half
    assert out.head_rows == 2 * unguided_rows - first


def test_unconditional_model_samples_by_batch_size():
    model = tiny(num_classes=0)
    assert model.class_emb.num_embeddings == 1
    lat = model.sample(batch_size=2, guidance_scale=1.0, steps=2)
    assert lat.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(batch_size=2, guidance_scale=2.0, steps=2)
    with pytest.raises(ValueError, match="class_labels"):
        model.sample([1], guidance_scale=1.0)


def test_other_scale_lists_and_class_counts():
    model = tiny(scales=(1, 2, 4), num_classes=3)
    assert model.sample([0, 2], steps=2).shape == (2, 4, 4, 4)
    out = model.train()(torch.randn(2, 4, 4, 4), torch.tensor([0, 2]))
    assert out.loss_per_scale.shape == (3,)


def test_loss_is_finite_weighted_and_backpropagates():
    model = tiny().train()
    latents = torch.randn(3, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    times = [torch.rand(3, generator=g) for _ in model.config.scales]
    noise = _noise(model, 3, seed=1)
    drop = torch.tensor([False, True, False])
    out = model(latents, torch.tensor([0, 1, 2]), drop_mask=drop, flow_times=times, flow_noise=noise)
    assert model.config.scales == (1, 2, 4, 8)
    # Each scale weighs by its share of the last scale's tokens, s^2 / 8^2, written out by hand.
    weights = torch.tensor([1 / 64, 4 / 64, 16 / 64, 64 / 64])
    torch.testing.assert_close(out.loss, (out.loss_per_scale * weights).sum())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    again = model(latents, torch.tensor([0, 1, 2]), drop_mask=drop, flow_times=times, flow_noise=noise)
    torch.testing.assert_close(again.loss, out.loss)


class ZeroVelocity(FlowHead, torch.nn.Module):
    """A head that predicts v = 0 everywhere: the flow loss is then mean((eps - x)^2), whatever t is."""

    def forward(self, x_t, t, cond):
        return torch.zeros_like(x_t)


def test_loss_weights_per_scale_losses_known_by_hand():
    model = tiny().train()
    model.flownet = ZeroVelocity()
    assert model.config.scales == (1, 2, 4, 8)
    # Zero latents (every scale's target is 0) and constant noise c_k = 1, 2, 3, 4 per scale: the
    # per-scale losses are c_k^2 = 1, 4, 9, 16 and the loss 1/64 + 4 * 4/64 + 9 * 16/64 + 16 * 64/64.
    latents = torch.zeros(2, 4, 8, 8)
    noise = [torch.full((2, s * s, 4), float(c)) for c, s in zip((1, 2, 3, 4), (1, 2, 4, 8))]
    times = [torch.full((2,), 0.5) for _ in range(4)]
    out = model(latents, torch.tensor([0, 1]), flow_times=times, flow_noise=noise)
    torch.testing.assert_close(out.loss_per_scale, torch.tensor([1.0, 4.0, 9.0, 16.0]))
    assert out.loss.item() == pytest.approx(1 / 64 + 16 / 64 + 144 / 64 + 16.0)  # 18.515625


def test_loss_targets_are_the_area_pooled_latents():
    model = tiny().train()
    model.flownet = ZeroVelocity()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = _noise(model, 2, seed=4)
    times = [torch.rand(2, generator=g) for _ in range(4)]
    out = model(latents, torch.tensor([3, 8]), flow_times=times, flow_noise=noise)
    expected = []
    for s, eps in zip((1, 2, 4, 8), noise):
        # Each s x s target is the mean of (8/s) x (8/s) blocks, as row-major tokens (B, s*s, C).
        f = 8 // s
        pooled = latents.reshape(2, 4, s, f, s, f).mean(dim=(3, 5))
        tokens = pooled.reshape(2, 4, s * s).transpose(1, 2)
        expected.append(((eps - tokens) ** 2).mean())
    expected = torch.stack(expected)
    torch.testing.assert_close(out.loss_per_scale, expected)
    torch.testing.assert_close(out.loss, expected[0] / 64 + expected[1] * 4 / 64 + expected[2] * 16 / 64 + expected[3])


def test_bf16_autocast_sampling_errs_by_what_bf16_rounding_makes():
    """bf16 keeps 8 significant bits (relative rounding 2^-8 per value). How far that moves a sample depends on
    the network's gain, so the yardstick is measured on the same model: a float32 sample from the weights rounded
    to bf16 (one rounding of every weight, nothing else). Autocast also rounds the activations, so its error
    may be a few times that (1.6-1.8x here), but not orders of magnitude more (a cache or a head run in the
    wrong dtype), and not zero (autocast did run in bf16)."""
    model = tiny()
    rounded = tiny()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    for seed in range(3):
        noise = _noise(model, 2, seed=seed)
        ref = model.sample([1, 2], steps=3, noise=noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.sample([1, 2], steps=3, noise=noise)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        bf16_error = (low - ref).abs().max()
        weight_rounding_error = (rounded.sample([1, 2], steps=3, noise=noise) - ref).abs().max()
        assert 0 < bf16_error < 4 * weight_rounding_error, (bf16_error, weight_rounding_error)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="heun"), "solver"),
        (dict(steps=0), "steps"),
        (dict(schedule="cosine"), "schedule"),
        (dict(cfg_schedule="cosine"), "cfg_schedule"),
        (dict(guidance_interval=(0.5, 0.2), guidance_scale=2.0), "guidance_interval"),
    ],
)
def test_bad_sampling_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny().sample([1], **kwargs)


def test_bad_labels_and_latents_name_the_argument():
    model = tiny()
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 9\].*\[10\]"):
        model.sample([1, 10])
    with pytest.raises(ValueError, match="class_labels"):
        model.sample([-1])
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, 8, 8\)"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise"):
        model.sample([1], noise=[torch.randn(1, 1, 4)])


def test_labels_of_two_dims_are_refused_not_read_as_more_images():
    model = tiny()
    with pytest.raises(ValueError, match=r"class_labels must be one label per image .*got shape \(2, 2\)"):
        model.sample(torch.tensor([[1, 2], [3, 4]]), steps=2)
    with pytest.raises(ValueError, match=r"class_labels must be one label per image .*got shape \(2, 1\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([[1], [2]]))
    assert model.sample(torch.tensor(3), steps=2).shape[0] == 1  # one label as a scalar is one image


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_forward_refuses_latents_that_are_not_finite(bad):
    model = tiny().train()
    latents = torch.randn(2, 4, 8, 8)
    latents[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="latents must be finite"):
        model(latents, torch.tensor([1, 2]))
