"""Typed sampling options: bad input is refused naming the argument, through every public entry point, and
the release defaults restated in the one guidance convention give the samples of the authors' arithmetic.

The two reference samplers at the end are written here from the models' public pieces (no KV cache, the
guidance written out in each family's own convention), independently of ``flowar.sampling``.
"""

import math

import pytest
import torch

from conftest import sharpened, tiny_flowar, tiny_flowar_pipeline, tiny_tokenizer, tiny_var, tiny_var_pipeline
from flowar import VAR, get_preset, get_var_preset
from flowar.config import FlowARSampling
from flowar.var_config import VARSampling
from heads.categorical import filter_logits
from heads.solvers import step_schedule
from vae.msvq import MultiScaleVQVAE, get_msvq_preset
from vae.pyramid import next_scale_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls; see conftest.py

NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def flowar():
    return tiny_flowar()


@pytest.fixture(scope="module")
def var():
    return tiny_var()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(0)


@pytest.fixture(scope="module")
def flowar_pipe():
    return tiny_flowar_pipeline()


@pytest.fixture(scope="module")
def var_pipe():
    return tiny_var_pipeline()


def flowar_noise(model, batch, seed=0):
    g = gen(seed)
    return [torch.randn(batch, s * s, model.config.token_dim, generator=g) for s in model.config.scales]


def var_uniforms(model, batch, seed=0):
    g = gen(seed)
    return [torch.rand(batch, s * s, generator=g, dtype=torch.float64) for s in model.config.scales]


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_guidance_scale_is_refused(flowar, var, tokenizer, value):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        FlowARSampling(guidance_scale=value)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        VARSampling(guidance_scale=value)
    with pytest.raises(ValueError, match="guidance_scale"):
        flowar.sample([1], guidance_scale=value, steps=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        var.sample([1], tokenizer=tokenizer, guidance_scale=value)


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_var_cfg_is_refused(var, tokenizer, var_pipe, value):
    with pytest.raises(ValueError, match="var_cfg must be a finite number"):
        VARSampling().replace(var_cfg=value)
    with pytest.raises(ValueError, match="var_cfg"):
        var.sample([1], tokenizer=tokenizer, var_cfg=value)
    with pytest.raises(ValueError, match="var_cfg"):
        var_pipe([1], var_cfg=value, output_type="latent")


def test_guidance_scale_must_be_a_number():
    for value in ("2", True, None, [2.0]):
        with pytest.raises(ValueError, match="guidance_scale"):
            FlowARSampling(guidance_scale=value)


def test_non_finite_guidance_through_the_pipeline(flowar_pipe):
    with pytest.raises(ValueError, match="guidance_scale"):
        flowar_pipe([1], guidance_scale=float("nan"), steps=2, output_type="latent")


# ---------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("labels", [[1.5], torch.tensor([1.0]), [1.0, 2.0]],
                         ids=["list-1.5", "tensor-1.0", "list-of-whole-floats"])
def test_float_class_labels_are_refused(flowar, var, tokenizer, flowar_pipe, var_pipe, labels):
    with pytest.raises(ValueError, match="class_labels must be integers"):
        flowar.sample(labels, steps=2)
    with pytest.raises(ValueError, match="class_labels must be integers"):
        var.sample(labels, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="class_labels must be integers"):
        flowar_pipe(labels, steps=2, output_type="latent")
    with pytest.raises(ValueError, match="class_labels must be integers"):
        var_pipe(labels, output_type="latent")


def test_integer_labels_of_any_integer_dtype_are_accepted(flowar):
    a = flowar.sample(torch.tensor([1, 2], dtype=torch.int32), steps=2, noise=flowar_noise(flowar, 2))
    b = flowar.sample([1, 2], steps=2, noise=flowar_noise(flowar, 2))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_flowar_noise_must_be_finite(flowar, flowar_pipe, bad):
    noise = flowar_noise(flowar, 2)
    noise[2][1, 3, 0] = bad
    with pytest.raises(ValueError, match="noise must be finite"):
        flowar.sample([1, 2], noise=noise)
    with pytest.raises(ValueError, match="noise must be finite"):
        flowar_pipe([1, 2], noise=noise, output_type="latent")


def test_flowar_noise_shapes_are_checked(flowar):
    noise = flowar_noise(flowar, 2)
    with pytest.raises(ValueError, match="noise must be a list of tensors of shapes"):
        flowar.sample([1, 2], noise=noise[:-1])
    with pytest.raises(ValueError, match="noise"):
        flowar.sample([1, 2, 3], noise=noise)  # two rows for three labels


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_var_noise_must_be_uniforms_in_the_unit_interval(var, tokenizer, var_pipe, bad):
    noise = var_uniforms(var, 2)
    noise[1][0, 2] = bad
    with pytest.raises(ValueError, match=r"noise .*must lie in \[0, 1\)"):
        var.sample([1, 2], tokenizer=tokenizer, noise=noise)
    with pytest.raises(ValueError, match="noise"):
        var_pipe([1, 2], noise=noise, output_type="latent")


def test_var_noise_at_the_edges_of_the_interval_is_accepted(var, tokenizer):
    noise = var_uniforms(var, 2)
    noise[0][:] = 0.0
    noise[-1][0, 0] = math.nextafter(1.0, 0.0)
    out = var.sample([1, 2], tokenizer=tokenizer, noise=noise)
    assert [tuple(i.shape) for i in out.indices] == [(2, s, s) for s in var.config.scales]


# ---------------------------------------------------------------------------------------------- solver
@pytest.mark.parametrize("name", ["atol", "rtol"])
@pytest.mark.parametrize("value", [0.0, -1e-4, float("nan")])
def test_tolerances_must_be_positive_numbers(flowar, flowar_pipe, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
        FlowARSampling(solver="dopri5", steps=None, **{name: value})
    with pytest.raises(ValueError, match=name):
        flowar.sample([1], solver="dopri5", **{name: value})
    with pytest.raises(ValueError, match=name):
        flowar_pipe([1], solver="dopri5", output_type="latent", **{name: value})


def test_steps_with_dopri5_are_refused(flowar, flowar_pipe):
    with pytest.raises(ValueError, match="steps must be None for the adaptive dopri5 solver"):
        FlowARSampling(solver="dopri5", steps=10)
    with pytest.raises(ValueError, match="steps must be None"):
        FlowARSampling().replace(solver="dopri5", steps=10)
    with pytest.raises(ValueError, match="steps"):
        flowar.sample([1], solver="dopri5", steps=10)
    with pytest.raises(ValueError, match="steps"):
        flowar_pipe([1], solver="dopri5", steps=10, output_type="latent")


def test_switching_to_dopri5_through_overrides_drops_the_saved_steps():
    flowar = tiny_flowar(scales=(1, 2, 4))  # a random head makes dopri5 work hard: three scales suffice
    assert flowar.config.sampling.steps == 10  # flowar-tiny's saved default
    options = flowar.sampling_options(solver="dopri5")
    assert (options.solver, options.steps) == ("dopri5", None)
    assert FlowARSampling(steps=7).replace(solver="dopri5").steps is None
    noise = flowar_noise(flowar, 2)
    loose = flowar.sample_with_stats([1, 2], solver="dopri5", atol=1e-2, rtol=1e-2, noise=noise)
    tight = flowar.sample_with_stats([1, 2], solver="dopri5", atol=1e-3, rtol=1e-3, noise=noise)
    fixed = flowar.sample_with_stats([1, 2], noise=noise)
    assert fixed.nfe_per_scale == [10] * 3  # the saved grid: 10 Euler steps per scale
    assert loose.nfe_per_scale != fixed.nfe_per_scale
    assert sum(loose.nfe_per_scale) < sum(tight.nfe_per_scale)  # adaptive: the tolerance sets the work
    assert torch.isfinite(loose.latents).all() and torch.isfinite(tight.latents).all()


def test_other_solver_options_are_validated(flowar):
    with pytest.raises(ValueError, match="solver must be one of"):
        FlowARSampling(solver="heun")
    with pytest.raises(ValueError, match="schedule must be one of"):
        flowar.sample([1], schedule="cosine")
    with pytest.raises(ValueError, match="guidance_interval"):
        flowar.sample([1], guidance_interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="guidance_interval must be two numbers"):
        FlowARSampling(guidance_interval=0.5)
    with pytest.raises(ValueError, match="cfg_schedule must be one of"):
        flowar.sample([1], cfg_schedule="cosine")
    with pytest.raises(ValueError, match="top_k"):
        VARSampling(top_k=-1)
    with pytest.raises(ValueError, match="more_smooth"):
        VARSampling(more_smooth=1)


# ---------------------------------------------------------------------------------------------- option names
def test_unknown_option_names_are_refused_listing_the_options(flowar, var, tokenizer, flowar_pipe, var_pipe):
    with pytest.raises(ValueError, match="top_k is not a sampling option of FlowARSampling") as err:
        flowar.sample([1], top_k=5)
    assert all(name in str(err.value) for name in ("guidance_scale", "guidance_interval", "solver", "steps", "atol"))
    with pytest.raises(ValueError, match="steps is not a sampling option of VARSampling") as err:
        var.sample([1], tokenizer=tokenizer, steps=5)
    assert all(name in str(err.value) for name in ("guidance_scale", "top_k", "top_p", "temperature", "more_smooth"))
    with pytest.raises(ValueError, match="cfg is not a sampling option"):  # the old keyword is gone
        flowar_pipe([1], cfg=2.0, output_type="latent")
    with pytest.raises(ValueError, match="steps is not a sampling option of VARSampling"):
        var_pipe([1], steps=5, output_type="latent")
    with pytest.raises(ValueError, match="solvers, top_k are not sampling options"):
        FlowARSampling().replace(top_k=1, solvers="euler")


def test_none_means_not_given(flowar):
    saved = flowar.config.sampling
    assert saved.replace(guidance_scale=None, steps=None, solver=None) == saved


def test_sampling_must_be_the_family_options(flowar, var, tokenizer):
    with pytest.raises(ValueError, match="sampling must be a FlowARSampling"):
        flowar.sample([1], sampling=VARSampling())
    with pytest.raises(ValueError, match="sampling must be a VARSampling"):
        var.sample([1], tokenizer=tokenizer, sampling=FlowARSampling())


def test_an_explicit_sampling_replaces_the_saved_defaults(flowar):
    noise = flowar_noise(flowar, 1)
    given = FlowARSampling(guidance_scale=3.0, steps=4, guidance_interval=(0.0, 0.9))
    a = flowar.sample_with_stats([1], sampling=given, noise=noise)
    b = flowar.sample_with_stats([1], guidance_scale=3.0, steps=4, noise=noise)  # saved interval is (0, 0.9)
    assert a.nfe_per_scale == [4] * 4 and torch.equal(a.latents, b.latents)
    c = flowar.sample_with_stats([1], sampling=given, steps=2, noise=noise)  # options update the given sampling
    assert c.nfe_per_scale == [2] * 4


# ---------------------------------------------------------------------------------------------- unconditional
def test_guidance_on_an_unconditional_model_is_refused():
    flowar = tiny_flowar(num_classes=0)
    var = tiny_var(num_classes=0)
    tokenizer = tiny_tokenizer(0)
    with pytest.raises(ValueError, match="guidance_scale must be 1 for an unconditional model"):
        flowar.sample(batch_size=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale must be 1 for an unconditional model"):
        var.sample(batch_size=2, tokenizer=tokenizer, guidance_scale=2.5)
    with pytest.raises(ValueError, match="guidance_scale must be 1 for an unconditional model"):
        var.sample(batch_size=2, tokenizer=tokenizer, var_cfg=1.5)
    with pytest.raises(ValueError, match="guidance_scale must be 1 for an unconditional model"):
        flowar.sample(batch_size=2, sampling=FlowARSampling(guidance_scale=2.0))  # explicitly asked for


def test_an_unconditional_model_with_a_guided_saved_default_samples_unguided():
    flowar = tiny_flowar(num_classes=0)  # flowar-tiny saves guidance 2.0
    assert flowar.config.sampling.guidance_scale == 2.0
    noise = flowar_noise(flowar, 2)
    default = flowar.sample_with_stats(batch_size=2, noise=noise)
    unguided = flowar.sample_with_stats(batch_size=2, guidance_scale=1.0, noise=noise)
    assert torch.equal(default.latents, unguided.latents)
    tokens = sum(s * s for s in flowar.config.scales)
    assert default.head_rows == 2 * 10 * tokens  # batch x steps x tokens: no doubled (null) rows

    var = tiny_var(num_classes=0)  # var-tiny saves guidance 2.5 (VAR's cfg 1.5)
    tokenizer = tiny_tokenizer(0)
    assert var.config.sampling.guidance_scale == 2.5
    a = var.sample(batch_size=2, tokenizer=tokenizer, generator=gen(3))
    b = var.sample(batch_size=2, tokenizer=tokenizer, guidance_scale=1.0, generator=gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


# ---------------------------------------------------------------------------------------------- VAR's cfg
def test_guidance_scale_and_var_cfg_together_are_refused(var, tokenizer, var_pipe):
    with pytest.raises(ValueError, match="guidance_scale .* or var_cfg .*not both"):
        VARSampling().replace(guidance_scale=2.5, var_cfg=1.5)
    with pytest.raises(ValueError, match="not both"):
        var.sample([1], tokenizer=tokenizer, guidance_scale=2.5, var_cfg=1.5)
    with pytest.raises(ValueError, match="not both"):
        var_pipe([1], guidance_scale=2.5, var_cfg=1.5, output_type="latent")


def test_var_cfg_is_guidance_scale_minus_one(var, tokenizer):
    assert VARSampling().replace(var_cfg=1.5) == VARSampling(guidance_scale=2.5)
    assert VARSampling(guidance_scale=2.5).var_cfg == 1.5
    assert VARSampling().replace(var_cfg=0.0).guided is False
    for c in (0.0, 0.75, 3.0):
        a = var.sample([1, 4], tokenizer=tokenizer, var_cfg=c, top_k=8, generator=gen(5))
        b = var.sample([1, 4], tokenizer=tokenizer, guidance_scale=1 + c, top_k=8, generator=gen(5))
        assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
        torch.testing.assert_close(a.f_hat, b.f_hat, rtol=0, atol=0)
    # and the guidance matters here, so the equalities above say something
    strong = var.sample([1, 4], tokenizer=tokenizer, var_cfg=3.0, top_k=8, generator=gen(5))
    none = var.sample([1, 4], tokenizer=tokenizer, var_cfg=0.0, top_k=8, generator=gen(5))
    assert any(not torch.equal(x, y) for x, y in zip(strong.indices, none.indices))


# ---------------------------------------------------------------------------------------------- references
def segments(scales):
    """[start, end) of each scale's tokens in the flattened pyramid."""
    out, start = [], 0
    for s in scales:
        out.append((start, start + s * s))
        start += s * s
    return out


@torch.no_grad()
def var_reference_sample(model, tokenizer, labels, *, var_cfg, top_k, top_p, generator):
    """VAR's sampler as its authors write it, without a KV cache: every scale recomputes the transformer over
    all scales so far; logits (1 + t) cond - t uncond with t = cfg k / (K - 1); top-k, top-p; one multinomial."""
    c = model.config
    scales, vocab, batch = c.scales, c.vocab_size, len(labels)
    rows = torch.cat([labels, torch.full_like(labels, c.num_classes)])  # conditional, then null class rows
    class_embedding = model.class_emb(rows)
    modulation = model.block_modulation(class_embedding)
    inputs, f_hat, indices = None, None, []
    for k, (side, (start, end)) in enumerate(zip(scales, segments(scales))):
        tokens = model.embed_inputs(class_embedding, inputs)
        hidden = model.transformer(tokens, modulation, sides=scales[: k + 1])
        logits = model.head_logits(hidden[:, start:end], class_embedding).float()
        cond, uncond = logits[:batch], logits[batch:]
        t = var_cfg * k / (len(scales) - 1)
        mixed = (1 + t) * cond - t * uncond
        probs = filter_logits(mixed, top_k=top_k, top_p=top_p).softmax(-1)
        ids = torch.multinomial(probs.view(-1, vocab), 1, replacement=True, generator=generator).view(batch, side, side)
        indices.append(ids)
        f_hat, next_input = tokenizer.accumulate(k, f_hat, ids)
        if next_input is not None:
            doubled = torch.cat([next_input, next_input])
            inputs = doubled if inputs is None else torch.cat([inputs, doubled], dim=1)
    return indices, f_hat


def test_var_release_default_gives_the_samples_of_var_cfg_1_5():
    """var-tiny's saved default guidance_scale 2.5 is VAR's cfg 1.5 (top-k / top-p as in var-d16's 900 / 0.96,
    scaled to V = 64: 10 / 0.9)."""
    torch.manual_seed(0)
    model = sharpened(VAR(get_var_preset("var-tiny", sampling={"top_k": 10, "top_p": 0.9})))
    tokenizer = MultiScaleVQVAE(get_msvq_preset("mnist")).eval()
    saved = model.config.sampling
    assert (saved.guidance_scale, saved.top_k, saved.top_p, saved.cfg_schedule) == (2.5, 10, 0.9, "linear")
    labels = torch.tensor([3, 0, 7])
    ours = model.sample(labels, tokenizer=tokenizer, generator=gen(11))
    ref_ids, ref_f_hat = var_reference_sample(model, tokenizer, labels, var_cfg=1.5, top_k=10, top_p=0.9,
                                              generator=gen(11))
    assert [tuple(i.shape) for i in ours.indices] == [(3, s, s) for s in model.config.scales]
    for k, (a, b) in enumerate(zip(ours.indices, ref_ids)):
        assert torch.equal(a, b), f"scale {k}"
    torch.testing.assert_close(ours.f_hat, ref_f_hat, rtol=1e-5, atol=1e-5)
    # The convention matters: 1.5 read as a guidance scale (VAR's cfg 0.5) samples other ids.
    misread, _ = var_reference_sample(model, tokenizer, labels, var_cfg=0.5, top_k=10, top_p=0.9, generator=gen(11))
    assert any(not torch.equal(a, b) for a, b in zip(ours.indices, misread))


@torch.no_grad()
def flowar_reference_sample(model, labels, noise, *, cfg, steps, interval):
    """FlowAR's sampler as its authors write it, without a KV cache: per scale the transformer over all scales
    so far, then Euler on the step grid with v_null + w (v_cond - v_null), w = 1 + (cfg - 1) k / (K - 1), at
    times inside the guidance interval (the conditional velocity elsewhere); float64 state."""
    c = model.config
    scales, batch = c.scales, len(labels)
    low, high = interval
    rows = torch.cat([labels, torch.full_like(labels, c.num_classes)])
    class_embedding = model.class_emb(rows)
    tokens = class_embedding[:, None]  # the first scale's input is the class token
    grid = step_schedule(steps, "flowar")
    x = None
    for k, (side, (start, end)) in enumerate(zip(scales, segments(scales))):
        if k > 0:  # the previous scale's tokens, bicubic up to full size, area down to this side
            previous = x.transpose(1, 2).reshape(batch, c.token_dim, scales[k - 1], scales[k - 1])
            upsampled = next_scale_input(previous, full_side=scales[-1], next_side=side).flatten(2).transpose(1, 2)
            tokens = torch.cat([tokens, model.z_proj(torch.cat([upsampled, upsampled]))], dim=1)
        z = model.transformer(tokens, class_embedding, sides=scales[: k + 1])[:, start:end].float()
        z_cond, z_null = z[:batch], z[batch:]
        w = 1 + (cfg - 1) * k / (len(scales) - 1)
        state = noise[k].double()
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            t = torch.full((batch,), t_cur.item())
            v_cond = model.flownet(state.float(), t, z_cond).double()
            if low <= t_cur.item() <= high:
                v_null = model.flownet(state.float(), t, z_null).double()
                v = v_null + w * (v_cond - v_null)
            else:
                v = v_cond
            state = state + (t_next - t_cur) * v
        x = state.float()
    return x.transpose(1, 2).reshape(batch, c.token_dim, scales[-1], scales[-1])


def test_flowar_release_default_gives_the_samples_of_the_authors_sampler():
    model = tiny_flowar()
    saved = model.config.sampling
    assert saved == get_preset("flowar-tiny").sampling
    assert (saved.guidance_scale, saved.steps, saved.schedule, saved.guidance_interval, saved.solver) == \
        (2.0, 10, "flowar", (0.0, 0.9), "euler")
    labels = torch.tensor([3, 8])
    noise = flowar_noise(model, 2, seed=4)
    ours = model.sample(labels, noise=noise)
    reference = flowar_reference_sample(model, labels, noise, cfg=2.0, steps=10, interval=(0.0, 0.9))
    # The cached transformer differs from the full recompute by float32 rounding only, but four scales of a
    # random head amplify it: ~1e-6 after two scales, ~3e-5 after four (latents up to ~6). Any real mistake
    # moves these samples by > 1e-2: guidance 2.1 instead of 2, guidance over (0, 1), the constant schedule,
    # the uniform grid (measured: 0.017, 0.097, 3.2, 2.8).
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    for wrong in (dict(cfg=2.1), dict(interval=(0.0, 1.0)), dict(cfg=1.0)):
        other = flowar_reference_sample(model, labels, noise, **{"cfg": 2.0, "steps": 10, "interval": (0.0, 0.9),
                                                                 **wrong})
        assert (ours - other).abs().max() > 1e-3, wrong
