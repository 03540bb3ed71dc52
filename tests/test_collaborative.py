"""Collaborative decoding (flowar.collaborative) on the one sampling engine: each model's stepper reproduces
its own sampler, the refiner's prefill equals teacher forcing, the split is exact at both ends, and
mismatches are refused."""

import numpy as np
import pytest
import torch
from conftest import gen, sharpened, tiny_flowar, tiny_tokenizer, tiny_vae, tiny_var, tiny_var_config

from flowar import FlowAR, FlowARPipeline, get_preset
from flowar.attention import scale_segments
from flowar.collaborative import CollaborativePipeline, collaborative_sample
from flowar.model import ScaleInput
from flowar.sampling import run_scales
from flowar.var import VAR
from flowar.var_pipeline import VARPipeline
from vae import area_pyramid

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LABELS = [1, 7]


def flowar_pair():
    """A 'large' and a 'small' random flowar-tiny: same scales, latent channels and classes; the small one
    saves its own guidance scale (3.0, the large one flowar-tiny's 2.0)."""
    large = tiny_flowar(0)
    small = tiny_flowar(None, width=32, num_heads=2, encoder_depth=1, decoder_depth=1, head_depth=1,
                        sampling={"guidance_scale": 3.0})
    return large, small


def var_pair():
    large = tiny_var(0)
    small = sharpened(VAR(tiny_var_config(depth=1, width=32, num_heads=2)))
    return large, small, tiny_tokenizer()


def same_tokens(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and torch.equal(a.f_hat, b.f_hat)


def copy_module(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


# ---------------------------------------------------------------------------------------------- FlowAR
@pytest.mark.parametrize("guidance_scale, solver", [(1.0, "euler"), (2.5, "euler"), (2.5, "midpoint")])
def test_flowar_split_at_either_end_is_one_model_alone(guidance_scale, solver):
    large, small = flowar_pair()
    options = dict(guidance_scale=guidance_scale, steps=4, solver=solver)
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
    noise = small.noise_from_seeds([5, 6])
    # guidance not given: each model uses its own saved default (small: 3.0), as small.sample does.
    none = collaborative_sample(large, small, LABELS, draft_scales=0, noise=noise, steps=2)
    assert torch.equal(none.sample.latents, small.sample(LABELS, noise=noise, steps=2))
    every = collaborative_sample(large, small, LABELS, draft_scales=4, noise=noise, steps=2)
    assert torch.equal(every.sample.latents, large.sample(LABELS, noise=noise, steps=2))
    with pytest.raises(ValueError, match="noise"):
        collaborative_sample(large, small, LABELS, draft_scales=0, noise=noise[:2], steps=2)


def test_refine_options_apply_to_the_refiner_only():
    large, small = flowar_pair()
    options = dict(guidance_scale=2.0, steps=3)
    # Refiner alone with its own options is its own sample with them; the drafter alone ignores them.
    none = collaborative_sample(large, small, LABELS, draft_scales=0, generator=gen(2),
                                refine_options={"steps": 2}, **options)
    assert torch.equal(none.sample.latents, small.sample(LABELS, generator=gen(2), guidance_scale=2.0, steps=2))
    every = collaborative_sample(large, small, LABELS, draft_scales=4, generator=gen(2),
                                 refine_options={"steps": 2}, **options)
    assert torch.equal(every.sample.latents, large.sample(LABELS, generator=gen(2), **options))
    refined = small.sampling_options(guidance_scale=2.0, steps=2)
    same = collaborative_sample(large, small, LABELS, draft_scales=0, generator=gen(2), refine_sampling=refined)
    assert torch.equal(same.sample.latents, none.sample.latents)


@pytest.mark.parametrize("draft_scales", [1, 2, 3])
def test_a_model_refining_its_own_copy_is_the_model_alone(draft_scales):
    """The refiner's prefill puts it exactly where it would be had it drafted the prefix itself."""
    large, _ = flowar_pair()
    copy = copy_module(large)
    options = dict(guidance_scale=2.5, steps=3)
    out = collaborative_sample(large, copy, LABELS, draft_scales=draft_scales, generator=gen(8), **options)
    assert torch.equal(out.sample.latents, large.sample(LABELS, generator=gen(8), **options))
    var_large, _, tokenizer = var_pair()
    var_copy = copy_module(var_large)
    options = dict(var_cfg=1.5, top_k=8)
    out = collaborative_sample(var_large, var_copy, LABELS, draft_scales=draft_scales, autoencoder=tokenizer,
                               generator=gen(8), **options)
    assert same_tokens(out.sample, var_large.sample(LABELS, tokenizer=tokenizer, generator=gen(8), **options))


def test_flowar_refiner_prefill_equals_teacher_forcing():
    """KV cache == recompute: after feeding the drafted scales one cached pass at a time, the refiner's
    conditions for the next scale equal those of its block-causal (uncached) forward over the same
    teacher-forced inputs."""
    _, small = flowar_pair()
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    pyramid = area_pyramid(latents, small.config.scales)
    inputs = small.input_tokens(pyramid)  # (B, L - 1, C): the upsampled targets, scales 2..K
    segments = scale_segments(small.config.scales)
    labels = torch.tensor(LABELS)
    stepper = small.stepper(labels, small.sampling_options(guidance_scale=2.0, steps=2))
    for k in range(3):  # scales 1 and 2 drafted, then scale 4's input
        stepper.feed(ScaleInput(inputs[:, segments[k][0] - 1:segments[k][1] - 1]) if k else None, prefill=k < 2)
    class_embedding = small.class_emb(labels)
    tokens = torch.cat([class_embedding[:, None], small.z_proj(inputs)], dim=1)
    with torch.no_grad():
        z = small.transformer(tokens, class_embedding)
    start, end = segments[2]
    torch.testing.assert_close(stepper.z[:2], z[:, start:end], rtol=1e-5, atol=1e-5)
    assert stepper.counts.forwards == 3 and stepper.counts.prefill_forwards == 2 and stepper.scales_seen == 3


def test_run_scales_with_one_stepper_is_the_models_sample():
    """The engine's driver with one stepper for every scale is plain sampling; a stepper fed past the last
    scale is refused."""
    _, small = flowar_pair()
    options = small.sampling_options(guidance_scale=2.0, steps=2)
    stepper = small.stepper(torch.tensor(LABELS), options)
    out = run_scales([stepper] * 4, small.canvas(2), generator=gen(4))
    assert torch.equal(out.latents, small.sample(LABELS, sampling=options, generator=gen(4)))
    assert stepper.counts.forwards == 4 and stepper.counts.prefill_forwards == 0 and stepper.cache is None
    with pytest.raises(ValueError, match="scales were fed"):
        stepper.feed(None)


def test_flowar_counts_and_time_split():
    large, small = flowar_pair()
    out = collaborative_sample(large, small, LABELS, draft_scales=3, guidance_scale=2.0, steps=4, generator=gen())
    s = out.stats
    assert s.draft_scales == 3
    assert (s.draft.forwards, s.draft.prefill_forwards) == (3, 0)
    assert (s.refine.forwards, s.refine.prefill_forwards) == (4, 3)  # 3 drafted scales teacher-forced, 1 sampled
    # steps=4 on the flowar schedule: times 1, 0.3 | 0.25, 0.125, 0: four Euler steps per scale
    assert s.nfe_per_scale == [4, 4, 4, 4] and s.draft.nfe == 12 and s.refine.nfe == 4
    assert out.sample.nfe_per_scale == s.nfe_per_scale
    assert s.draft.seconds > 0 and s.refine.seconds > 0 and s.seconds >= s.draft.seconds + s.refine.seconds - 1e-3


# ---------------------------------------------------------------------------------------------- VAR
@pytest.mark.parametrize("var_cfg", [0.0, 1.5])
def test_var_split_at_either_end_is_one_model_alone(var_cfg):
    large, small, tokenizer = var_pair()
    options = dict(var_cfg=var_cfg, top_k=10, top_p=0.9)
    alone_small = small.sample(LABELS, tokenizer=tokenizer, generator=gen(2), **options)
    alone_large = large.sample(LABELS, tokenizer=tokenizer, generator=gen(2), **options)

    def code(draft_scales):
        return collaborative_sample(large, small, LABELS, draft_scales=draft_scales, autoencoder=tokenizer,
                                    generator=gen(2), **options).sample

    assert same_tokens(code(0), alone_small)
    assert same_tokens(code(4), alone_large)
    mixed = code(2)
    assert not all(torch.equal(a, b) for a, b in zip(mixed.indices, alone_large.indices))
    assert not all(torch.equal(a, b) for a, b in zip(mixed.indices, alone_small.indices))


def test_var_code_with_more_smooth_is_the_models_more_smooth_sample():
    """more_smooth goes through CoDe: drafter alone (draft_scales = K) and refiner alone (0) equal their own
    ``sample(..., more_smooth=True)``, which differs from sampling without it."""
    large, small, tokenizer = var_pair()
    options = dict(var_cfg=1.5, top_k=10, more_smooth=True)
    for draft_scales, alone in ((4, large), (0, small)):
        ours = collaborative_sample(large, small, LABELS, draft_scales=draft_scales, autoencoder=tokenizer,
                                    generator=gen(3), **options).sample
        assert same_tokens(ours, alone.sample(LABELS, tokenizer=tokenizer, generator=gen(3), **options))
    plain = large.sample(LABELS, tokenizer=tokenizer, generator=gen(3), var_cfg=1.5, top_k=10)
    smooth = large.sample(LABELS, tokenizer=tokenizer, generator=gen(3), **options)
    assert not torch.equal(plain.f_hat, smooth.f_hat)
    mixed = collaborative_sample(large, small, LABELS, draft_scales=2, autoencoder=tokenizer, generator=gen(3),
                                 **options).sample
    assert mixed.f_hat.shape == smooth.f_hat.shape and torch.isfinite(mixed.f_hat).all()


def test_var_code_with_given_uniforms_is_the_models_sample_with_them():
    large, small, tokenizer = var_pair()
    noise = large.noise_from_seeds([11, 12])
    options = dict(var_cfg=1.5, top_k=10)
    for draft_scales, alone in ((4, large), (0, small)):
        ours = collaborative_sample(large, small, LABELS, draft_scales=draft_scales, autoencoder=tokenizer,
                                    noise=noise, **options).sample
        assert same_tokens(ours, alone.sample(LABELS, tokenizer=tokenizer, noise=noise, **options))
    # the drafted scales are the drafter's own draws from the same uniforms
    mixed = collaborative_sample(large, small, LABELS, draft_scales=2, autoencoder=tokenizer, noise=noise,
                                 **options).sample
    alone = large.sample(LABELS, tokenizer=tokenizer, noise=noise, **options)
    assert all(torch.equal(a, b) for a, b in zip(mixed.indices[:2], alone.indices[:2]))


def test_var_drafted_scales_are_the_drafters_and_the_refiner_continues_them():
    large, small, tokenizer = var_pair()
    options = dict(var_cfg=1.0)
    alone_large = large.sample(LABELS, tokenizer=tokenizer, generator=gen(4), **options)
    mixed = collaborative_sample(large, small, LABELS, draft_scales=2, autoencoder=tokenizer, generator=gen(4),
                                 **options)
    # the first two scales consumed the generator exactly as the drafter alone does
    assert all(torch.equal(a, b) for a, b in zip(mixed.sample.indices[:2], alone_large.indices[:2]))
    s = mixed.stats
    assert (s.draft.forwards, s.refine.forwards, s.refine.prefill_forwards) == (2, 4, 2)
    assert s.nfe_per_scale == [0, 0, 0, 0] and s.forwards == 6


def test_var_refiner_prefill_equals_teacher_forcing():
    """KV cache == recompute for VAR: the logits of the scale after three prefilled ones equal the uncached
    block-causal forward's."""
    _, small, tokenizer = var_pair()
    g = gen(6)
    indices = [torch.randint(0, 32, (2, s, s), generator=g) for s in small.config.scales]
    inputs = tokenizer.teacher_forcing_inputs(indices)  # (B, 29, Cvae) for scales 2..4
    segments = scale_segments(small.config.scales)
    labels = torch.tensor(LABELS)
    stepper = small.stepper(labels, small.sampling_options(var_cfg=0.0))
    for k in range(4):
        nxt = None if k == 0 else inputs[:, segments[k][0] - 1:segments[k][1] - 1]
        stepper.feed(nxt, prefill=k < 3)
    with torch.no_grad():
        logits = small.logits(inputs, LABELS)
    torch.testing.assert_close(stepper.logits, logits[:, segments[3][0]:].float(), rtol=1e-4, atol=1e-4)
    assert stepper.counts.forwards == 4 and stepper.counts.prefill_forwards == 3


# ---------------------------------------------------------------------------------------------- refusals
def test_mismatched_models_are_refused():
    large, small = flowar_pair()
    var_large, var_small, tokenizer = var_pair()
    cases = [
        (large, var_small, "models of one family"),
        (large, FlowAR(get_preset("flowar-tiny", scales=(1, 2, 4))), "scales"),
        (large, FlowAR(get_preset("flowar-tiny", token_dim=8)), "token_dim"),
        (large, FlowAR(get_preset("flowar-tiny", num_classes=5)), "num_classes"),
        (var_large, VAR(tiny_var_config(vocab_size=16)), "vocab_size"),
        (var_large, VAR(tiny_var_config(code_dim=4)), "code_dim"),
    ]
    for draft, refine, message in cases:
        with pytest.raises(ValueError, match=message):
            collaborative_sample(draft, refine, LABELS, draft_scales=1, autoencoder=tokenizer)
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(ValueError, match="draft_scales"):
            collaborative_sample(large, small, LABELS, draft_scales=bad)
    with pytest.raises(ValueError, match="tokenizer"):
        collaborative_sample(var_large, var_small, LABELS, draft_scales=1)
    with pytest.raises(ValueError, match="tokenizer"):  # a tokenizer of other scales
        collaborative_sample(var_large, var_small, LABELS, draft_scales=1,
                             autoencoder=tiny_tokenizer(scales=(1, 2, 4)))
    with pytest.raises(ValueError, match="steps"):  # options are validated, naming the field
        collaborative_sample(large, small, LABELS, draft_scales=1, steps=0)
    with pytest.raises(ValueError, match="top_k"):  # an option of the other family
        collaborative_sample(large, small, LABELS, draft_scales=1, top_k=5)


def test_pipelines_must_share_their_autoencoder():
    large, small = flowar_pair()
    vae = tiny_vae()
    with pytest.raises(ValueError, match="share one vae"):
        CollaborativePipeline(FlowARPipeline(large, vae), FlowARPipeline(small, tiny_vae(seed=1)), 2)
    same_weights = tiny_vae()  # another object with the same weights decodes identically: accepted
    CollaborativePipeline(FlowARPipeline(large, vae), FlowARPipeline(small, same_weights), 2)
    var_large, var_small, tokenizer = var_pair()
    other = tiny_tokenizer(seed=9)
    with pytest.raises(ValueError, match="share one tokenizer"):
        CollaborativePipeline(VARPipeline(var_large, tokenizer), VARPipeline(var_small, other), 2)
    with pytest.raises(ValueError, match="pipelines of the same kind"):
        CollaborativePipeline(FlowARPipeline(large, vae), VARPipeline(var_small, tokenizer), 2)
    with pytest.raises(ValueError, match="draft_scales"):
        CollaborativePipeline(FlowARPipeline(large, vae), FlowARPipeline(small, vae), 7)


# ---------------------------------------------------------------------------------------------- pipeline
def test_collaborative_pipeline_images_and_stats():
    large, small = flowar_pair()
    vae = tiny_vae()
    draft_pipe, refine_pipe = FlowARPipeline(large, vae), FlowARPipeline(small, vae)
    options = dict(guidance_scale=2.0, steps=2)
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
    smooth = CollaborativePipeline(var_draft, var_refine, 4)(LABELS, output_type="np", generator=gen(2),
                                                             more_smooth=True)
    np.testing.assert_array_equal(smooth, var_draft(LABELS, output_type="np", generator=gen(2), more_smooth=True))
    indices = CollaborativePipeline(var_draft, var_refine, 1)(LABELS, output_type="latent")
    assert [tuple(i.shape) for i in indices] == [(2, s, s) for s in (1, 2, 3, 4)]
