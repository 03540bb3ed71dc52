"""Collaborative decoding (flowar.collaborative): the scale-step samplers reproduce the models' own samplers,
the refiner's prefill equals teacher forcing, the split is exact at both ends, and mismatches are refused."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from flowar import FlowAR, FlowARPipeline, get_preset
from flowar.attention import scale_segments
from flowar.collaborative import (CollaborativePipeline, FlowARScaleSampler, VARScaleSampler,
                                  collaborative_sample)
from flowar.model import to_tokens
from flowar.var import VAR
from flowar.var_config import get_var_preset
from flowar.var_pipeline import VARPipeline
from vae import DiffusersVAE, area_pyramid
from vae.msvq import MultiScaleVQVAE, get_msvq_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LABELS = [1, 7]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def flowar_pair():
    """A 'large' and a 'small' random flowar-tiny: same scales, latent channels and classes."""
    torch.manual_seed(0)
    large = FlowAR(get_preset("flowar-tiny")).eval()
    small = FlowAR(get_preset("flowar-tiny", width=32, num_heads=2, encoder_depth=1, decoder_depth=1,
                              head_depth=1, default_cfg=3.0)).eval()
    return large, small


def var_config(**overrides):
    fields = dict(scales=(1, 2, 3, 4), vocab_size=32, code_dim=8, depth=2, width=64, num_heads=4)
    return get_var_preset("var-tiny", **{**fields, **overrides})


def sharpened(model: VAR) -> VAR:
    with torch.no_grad():  # open the AdaLN gates and sharpen the head, so every part changes the draws
        for block in model.blocks:
            block.ada_lin[1].weight.normal_(std=0.1)
            block.ada_lin[1].bias.normal_(std=0.1)
        model.head.weight.normal_(std=0.3)
    return model.eval()


def var_pair():
    torch.manual_seed(0)
    large = sharpened(VAR(var_config()))
    small = sharpened(VAR(var_config(depth=1, width=32, num_heads=2)))
    tokenizer = MultiScaleVQVAE(get_msvq_preset("tiny")).eval()
    return large, small, tokenizer


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    autoencoder = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=16, scaling_factor=0.5,
    )
    return DiffusersVAE(autoencoder).eval()


# ---------------------------------------------------------------------------------------------- FlowAR
@pytest.mark.parametrize("cfg, solver", [(1.0, "euler"), (2.5, "euler"), (2.5, "midpoint")])
def test_flowar_split_at_either_end_is_one_model_alone(cfg, solver):
    large, small = flowar_pair()
    options = dict(cfg=cfg, steps=4, solver=solver)
    alone_small = small.sample(LABELS, generator=gen(3), **options)
    alone_large = large.sample(LABELS, generator=gen(3), **options)
    none = collaborative_sample(large, small, LABELS, draft_scales=0, generator=gen(3), **options)
    every = collaborative_sample(large, small, LABELS, draft_scales=4, generator=gen(3), **options)
    assert torch.equal(none.sample.latents, alone_small)
    assert torch.equal(every.sample.latents, alone_large)
    mixed = collaborative_sample(large, small, LABELS, draft_scales=2, generator=gen(3), **options).sample.latents
    assert not torch.equal(mixed, alone_small) and not torch.equal(mixed, alone_large)


def test_flowar_per_sample_noise_and_own_defaults():
    large, small = flowar_pair()
    noise = [torch.randn(2, s * s, 4, generator=gen(5)) for s in small.config.scales]
    # cfg=None: each model uses its own default (small: 3.0), as small.sample does.
    none = collaborative_sample(large, small, LABELS, draft_scales=0, noise=noise, steps=2)
    assert torch.equal(none.sample.latents, small.sample(LABELS, noise=noise, steps=2))
    with pytest.raises(ValueError, match="noise"):
        collaborative_sample(large, small, LABELS, draft_scales=0, noise=noise[:2], steps=2)


@pytest.mark.parametrize("draft_scales", [1, 2, 3])
def test_a_model_refining_its_own_copy_is_the_model_alone(draft_scales):
    """The refiner's prefill puts it exactly where it would be had it drafted the prefix itself."""
    large, _ = flowar_pair()
    copy = copy_module(large)
    options = dict(cfg=2.5, steps=3)
    out = collaborative_sample(large, copy, LABELS, draft_scales=draft_scales, generator=gen(8), **options)
    assert torch.equal(out.sample.latents, large.sample(LABELS, generator=gen(8), **options))
    var_large, _, tokenizer = var_pair()
    var_copy = copy_module(var_large)
    options = dict(cfg=1.5, top_k=8, tokenizer=tokenizer)
    out = collaborative_sample(var_large, var_copy, LABELS, draft_scales=draft_scales, generator=gen(8), **options)
    alone = var_large.sample(LABELS, generator=gen(8), **options)
    assert all(torch.equal(a, b) for a, b in zip(out.sample.indices, alone.indices))


def copy_module(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_flowar_refiner_prefill_equals_teacher_forcing():
    """After feeding the drafted scales one cached pass at a time, the refiner's conditions for the next
    scale equal those of its block-causal (uncached) forward over the same teacher-forced inputs."""
    _, small = flowar_pair()
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    pyramid = area_pyramid(latents, small.config.scales)
    labels = torch.tensor(LABELS)
    sampler = FlowARScaleSampler(small, labels, cfg=2.0, steps=2)
    for k in range(3):  # scales 1, 2, 4 drafted, then scale 8's input
        sampler.feed(to_tokens(pyramid[k - 1]) if k else None, prefill=k < 2)
    class_embedding = small.class_emb(labels)
    tokens = torch.cat([class_embedding[:, None], small.z_proj(small.input_tokens(pyramid))], dim=1)
    with torch.no_grad():
        z = small.transformer(tokens, class_embedding)
    start, end = scale_segments(small.config.scales)[2]
    torch.testing.assert_close(sampler.z[:2], z[:, start:end], rtol=1e-5, atol=1e-5)
    assert sampler.counts.forwards == 3 and sampler.counts.prefill_forwards == 2


def test_flowar_counts_and_time_split():
    large, small = flowar_pair()
    out = collaborative_sample(large, small, LABELS, draft_scales=3, cfg=2.0, steps=4, generator=gen())
    s = out.stats
    assert s.draft_scales == 3
    assert (s.draft.forwards, s.draft.prefill_forwards) == (3, 0)
    assert (s.refine.forwards, s.refine.prefill_forwards) == (4, 3)  # 3 drafted scales teacher-forced, 1 sampled
    # steps=4 on the flowar schedule: times 1, 0.3 | 0.25, 0.125, 0: four Euler steps per scale
    assert s.nfe_per_scale == [4, 4, 4, 4] and s.draft.nfe == 12 and s.refine.nfe == 4
    assert out.sample.nfe_per_scale == s.nfe_per_scale
    assert s.draft.seconds > 0 and s.refine.seconds > 0 and s.seconds >= s.draft.seconds + s.refine.seconds - 1e-3


# ---------------------------------------------------------------------------------------------- VAR
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_var_split_at_either_end_is_one_model_alone(cfg):
    large, small, tokenizer = var_pair()
    options = dict(cfg=cfg, top_k=10, top_p=0.9, tokenizer=tokenizer)
    alone_small = small.sample(LABELS, generator=gen(2), **options)
    alone_large = large.sample(LABELS, generator=gen(2), **options)
    none = collaborative_sample(large, small, LABELS, draft_scales=0, generator=gen(2), **options).sample
    every = collaborative_sample(large, small, LABELS, draft_scales=4, generator=gen(2), **options).sample
    for ours, theirs in ((none, alone_small), (every, alone_large)):
        assert all(torch.equal(a, b) for a, b in zip(ours.indices, theirs.indices))
        assert torch.equal(ours.f_hat, theirs.f_hat)
    mixed = collaborative_sample(large, small, LABELS, draft_scales=2, generator=gen(2), **options).sample
    assert not all(torch.equal(a, b) for a, b in zip(mixed.indices, alone_large.indices))
    assert not all(torch.equal(a, b) for a, b in zip(mixed.indices, alone_small.indices))


def test_var_drafted_scales_are_the_drafters_and_the_refiner_continues_them():
    large, small, tokenizer = var_pair()
    options = dict(cfg=1.0, tokenizer=tokenizer)
    alone_large = large.sample(LABELS, generator=gen(4), **options)
    mixed = collaborative_sample(large, small, LABELS, draft_scales=2, generator=gen(4), **options)
    # the first two scales consumed the generator exactly as the drafter alone does
    assert all(torch.equal(a, b) for a, b in zip(mixed.sample.indices[:2], alone_large.indices[:2]))
    s = mixed.stats
    assert (s.draft.forwards, s.refine.forwards, s.refine.prefill_forwards) == (2, 4, 2)
    assert s.nfe_per_scale == [0, 0, 0, 0] and s.forwards == 6


def test_var_refiner_prefill_equals_teacher_forcing():
    _, small, tokenizer = var_pair()
    g = gen(6)
    indices = [torch.randint(0, 32, (2, s, s), generator=g) for s in small.config.scales]
    inputs = tokenizer.teacher_forcing_inputs(indices)  # (B, 29, Cvae) for scales 2..4
    segments = scale_segments(small.config.scales)
    labels = torch.tensor(LABELS)
    sampler = VARScaleSampler(small, labels, cfg=0.0)
    for k in range(4):
        nxt = None if k == 0 else inputs[:, segments[k][0] - 1:segments[k][1] - 1]
        sampler.feed(nxt, prefill=k < 3)
    with torch.no_grad():
        logits = small.logits(inputs, LABELS)
    torch.testing.assert_close(sampler.logits, logits[:, segments[3][0]:].float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- refusals
def test_mismatched_models_are_refused():
    large, small = flowar_pair()
    var_large, var_small, tokenizer = var_pair()
    cases = [
        (large, var_small, "both be FlowAR or both be VAR"),
        (large, FlowAR(get_preset("flowar-tiny", scales=(1, 2, 4))), "scales"),
        (large, FlowAR(get_preset("flowar-tiny", token_dim=8)), "token_dim"),
        (large, FlowAR(get_preset("flowar-tiny", num_classes=5)), "num_classes"),
        (var_large, VAR(var_config(vocab_size=16)), "vocab_size"),
        (var_large, VAR(var_config(code_dim=4)), "code_dim"),
    ]
    for draft, refine, message in cases:
        with pytest.raises(ValueError, match=message):
            collaborative_sample(draft, refine, LABELS, draft_scales=1, tokenizer=tokenizer)
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(ValueError, match="draft_scales"):
            collaborative_sample(large, small, LABELS, draft_scales=bad)
    with pytest.raises(ValueError, match="tokenizer"):
        collaborative_sample(var_large, var_small, LABELS, draft_scales=1)
    with pytest.raises(ValueError, match="tokenizer"):  # a tokenizer of other scales
        collaborative_sample(var_large, var_small, LABELS, draft_scales=1,
                             tokenizer=MultiScaleVQVAE(get_msvq_preset("tiny", scales=(1, 2, 4))))


def test_pipelines_must_share_their_autoencoder():
    large, small = flowar_pair()
    vae = tiny_vae()
    with pytest.raises(ValueError, match="share one vae"):
        CollaborativePipeline(FlowARPipeline(large, vae), FlowARPipeline(small, tiny_vae(seed=1)), 2)
    same_weights = tiny_vae()  # another object with the same weights decodes identically: accepted
    CollaborativePipeline(FlowARPipeline(large, vae), FlowARPipeline(small, same_weights), 2)
    var_large, var_small, tokenizer = var_pair()
    torch.manual_seed(9)
    other = MultiScaleVQVAE(get_msvq_preset("tiny")).eval()
    with pytest.raises(ValueError, match="share one tokenizer"):
        CollaborativePipeline(VARPipeline(var_large, tokenizer), VARPipeline(var_small, other), 2)
    with pytest.raises(ValueError, match="both be FlowAR or both be VAR"):
        CollaborativePipeline(FlowARPipeline(large, vae), VARPipeline(var_small, tokenizer), 2)
    with pytest.raises(ValueError, match="draft_scales"):
        CollaborativePipeline(FlowARPipeline(large, vae), FlowARPipeline(small, vae), 7)


# ---------------------------------------------------------------------------------------------- pipeline
def test_collaborative_pipeline_images_and_stats():
    large, small = flowar_pair()
    vae = tiny_vae()
    draft_pipe, refine_pipe = FlowARPipeline(large, vae), FlowARPipeline(small, vae)
    options = dict(cfg=2.0, steps=2)
    ours = CollaborativePipeline(draft_pipe, refine_pipe, 0)(LABELS, output_type="np", generator=gen(1), **options)
    np.testing.assert_array_equal(ours, refine_pipe(LABELS, output_type="np", generator=gen(1), **options))
    pipe = CollaborativePipeline(draft_pipe, refine_pipe, 2)
    images, stats = pipe(LABELS, output_type="pt", return_stats=True, generator=gen(1), **options)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert stats.draft.forwards == 2 and stats.refine.prefill_forwards == 2
    pil = pipe([3], output_type="pil", **options)
    assert len(pil) == 1 and pil[0].size == (16, 16)
    assert pipe([3], output_type="latent", **options).shape == (1, 4, 8, 8)

    var_large, var_small, tokenizer = var_pair()
    var_draft, var_refine = VARPipeline(var_large, tokenizer), VARPipeline(var_small, tokenizer)
    ours = CollaborativePipeline(var_draft, var_refine, 4)(LABELS, output_type="np", generator=gen(2))
    np.testing.assert_array_equal(ours, var_draft(LABELS, output_type="np", generator=gen(2)))
    indices = CollaborativePipeline(var_draft, var_refine, 1)(LABELS, output_type="latent")
    assert [tuple(i.shape) for i in indices] == [(2, s, s) for s in (1, 2, 3, 4)]
