"""FlowAR model: mask, attention, sampling with and without the KV cache, guidance, errors."""

import pytest
import torch
import torch.nn.functional as F

from flowar import FlowAR, get_preset
from flowar.attention import block_causal_attention, block_causal_mask, scale_segments
from flowar.model import from_tokens, to_tokens
from heads.solvers import sample_flow
from vae.pyramid import next_scale_input


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
        x = sample_flow(model.flownet, noise[k], z[:, start:end], steps=steps).x.float()
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
        cached = model.sample(labels, cfg=1.0, steps=4, noise=noise)
        recomputed = _sample_without_cache(model, labels, noise, steps=4)
    assert cached.shape == (3, 4, 8, 8)
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


def test_same_generator_same_samples_and_different_seed_differs():
    model = tiny()
    a = model.sample([2, 5], cfg=3.0, steps=3, generator=torch.Generator().manual_seed(11))
    b = model.sample([2, 5], cfg=3.0, steps=3, generator=torch.Generator().manual_seed(11))
    c = model.sample([2, 5], cfg=3.0, steps=3, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_one_equals_unguided_path_and_guidance_changes_samples():
    model = tiny()
    noise = _noise(model, 2)
    plain = model.sample_with_stats([4, 9], cfg=1.0, steps=4, noise=noise)
    # cfg=3 whose interval contains no step time: the null half is carried but never used
    never = model.sample_with_stats([4, 9], cfg=3.0, cfg_schedule="constant", guidance_interval=(0.0, 0.0),
                                    steps=4, noise=noise)
    # equal up to float32 rounding: the transformer runs 2B rows instead of B, so its matmuls block differently
    torch.testing.assert_close(plain.latents, never.latents, rtol=1e-4, atol=1e-4)
    assert plain.head_rows == never.head_rows  # the head ran on the conditional half only
    guided = model.sample_with_stats([4, 9], cfg=3.0, cfg_schedule="constant", guidance_interval=(0.0, 1.0),
                                     steps=4, noise=noise)
    assert not torch.allclose(plain.latents, guided.latents, atol=1e-4)
    assert guided.head_rows == 2 * plain.head_rows
    assert guided.nfe == plain.nfe == 4 * len(model.config.scales)


def test_linear_cfg_schedule_skips_guidance_at_the_first_scale():
    model = tiny()
    out = model.sample_with_stats([1], cfg=4.0, steps=4, guidance_interval=(0.0, 1.0))
    unguided_rows = sum(s * s for s in model.config.scales) * 4
    first = model.config.scales[0] ** 2 * 4
    # linear ramp: cfg is exactly 1 at the first scale, so only that scale evaluates a single half
    assert out.head_rows == 2 * unguided_rows - first


def test_unconditional_model_samples_by_batch_size():
    model = tiny(num_classes=0)
    assert model.class_emb.num_embeddings == 1
    lat = model.sample(batch_size=2, cfg=1.0, steps=2)
    assert lat.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="cfg"):
        model.sample(batch_size=2, cfg=2.0, steps=2)
    with pytest.raises(ValueError, match="class_labels"):
        model.sample([1], cfg=1.0)


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
    out = model(latents, torch.tensor([0, 1, 2]), flow_times=times, flow_noise=noise)
    weights = torch.tensor([s * s / 64 for s in model.config.scales])
    torch.testing.assert_close(out.loss, (out.loss_per_scale * weights).sum())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    again = model(latents, torch.tensor([0, 1, 2]), flow_times=times, flow_noise=noise)
    torch.testing.assert_close(again.loss, out.loss)


def test_bf16_autocast_sampling_runs_and_stays_close():
    model = tiny()
    noise = _noise(model, 2)
    ref = model.sample([1, 2], steps=3, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.sample([1, 2], steps=3, noise=noise)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.25 * ref.abs().max()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="heun"), "solver"),
        (dict(steps=0), "steps"),
        (dict(schedule="cosine"), "schedule"),
        (dict(cfg_schedule="cosine"), "cfg_schedule"),
        (dict(guidance_interval=(0.5, 0.2), cfg=2.0), "guidance_interval"),
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
