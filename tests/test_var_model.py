"""The VAR transformer: released sizes and key layout, block-causal attention, KV-cache sampling, guidance,
randomness, training, files and argument checks. Tokenizer: vae.msvq's "tiny" preset (scales 1, 2, 3, 4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from flowar import FlowAR, get_preset
import heads.categorical as categorical_module
from flowar.attention import scale_segments
from flowar.sampling import guidance_excess
from flowar.var import VAR, convert_released_var_state_dict
from flowar.var_config import SCALES_256, SCALES_512, VAR_PRESETS, VARConfig, get_var_preset
from heads.categorical import cfg_mix, sample_tokens
from vae.msvq import MultiScaleVQVAE, get_msvq_preset

# Parameters of the authors' models, counted by instantiating their VAR (FoundationVision/VAR models/var.py,
# build_vae_var's arguments; d36 with shared AdaLN and the 512 px scales, as the README's d36-s command) on
# the meta device; their README rounds them to 310M / 600M / 1.0B / 2.0B / 2.3B.
THEIR_PARAMETERS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356, 36: 2_353_893_904}
ROUNDED = {16: 310.3e6, 20: 600.9e6, 24: 1033.4e6, 30: 2010.0e6, 36: 2353.9e6}


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return MultiScaleVQVAE(get_msvq_preset("tiny")).eval()


def small_config(**overrides) -> VARConfig:
    """var-tiny shrunk to the tiny tokenizer (V 32, Cvae 8, scales 1..4: 30 tokens), two blocks."""
    fields = dict(scales=(1, 2, 3, 4), vocab_size=32, code_dim=8, depth=2, width=64, num_heads=4)
    return get_var_preset("var-tiny", **{**fields, **overrides})


def small_model(seed=0, **overrides) -> VAR:
    torch.manual_seed(seed)
    model = VAR(small_config(**overrides))
    with torch.no_grad():  # open the AdaLN gates and sharpen the head: every block and the head matter
        for block in model.blocks:
            if hasattr(block, "ada_lin"):
                block.ada_lin[1].weight.normal_(std=0.1)
                block.ada_lin[1].bias.normal_(std=0.1)
            else:
                block.ada_gss.normal_(std=0.3)
        model.head.weight.normal_(std=0.3)
    return model.eval()


def random_indices(config: VARConfig, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (batch, s, s), generator=g) for s in config.scales]


# ---------------------------------------------------------------------------------------- sizes and keys
@pytest.mark.parametrize("depth", sorted(THEIR_PARAMETERS))
def test_released_parameter_counts(depth):
    with torch.device("meta"):
        model = VAR(get_var_preset(f"var-d{depth}"))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - ROUNDED[depth]) / ROUNDED[depth] < 0.005
    assert count == THEIR_PARAMETERS[depth]
    c = model.config
    scales = SCALES_512 if depth == 36 else SCALES_256
    assert (c.width, c.num_heads, c.vocab_size, c.code_dim, c.scales) == (64 * depth, depth, 4096, 32, scales)
    assert c.drop_path == pytest.approx(0.1 * depth / 24) and c.attn_l2_norm and c.shared_adaln == (depth == 36)


def released_layout(config: VARConfig) -> dict[str, tuple]:
    """Key -> shape of the authors' VAR state dict, written down from their models/var.py and basic_var.py
    (buffers lvl_1L, attn_bias_for_masking and zero_k_bias included), independently of our module."""
    c, d = config, config.width
    length = sum(s * s for s in c.scales)
    layout = {
        "pos_start": (1, c.scales[0] ** 2, d),
        "pos_1LC": (1, length, d),
        "lvl_1L": (1, length),
        "attn_bias_for_masking": (1, 1, length, length),
        "word_embed.weight": (d, c.code_dim),
        "word_embed.bias": (d,),
        "class_emb.weight": (c.num_classes + 1, d),
        "lvl_embed.weight": (len(c.scales), d),
        "head_nm.ada_lin.1.weight": (2 * d, d),
        "head_nm.ada_lin.1.bias": (2 * d,),
        "head.weight": (c.vocab_size, d),
        "head.bias": (c.vocab_size,),
    }
    if c.shared_adaln:
        layout.update({"shared_ada_lin.1.weight": (6 * d, d), "shared_ada_lin.1.bias": (6 * d,)})
    hidden = round(d * c.mlp_ratio)
    for i in range(c.depth):
        p = f"blocks.{i}."
        layout.update({
            p + "attn.scale_mul_1H11": (1, c.num_heads, 1, 1),
            p + "attn.q_bias": (d,),
            p + "attn.v_bias": (d,),
            p + "attn.zero_k_bias": (d,),
            p + "attn.mat_qkv.weight": (3 * d, d),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "ffn.fc1.weight": (hidden, d),
            p + "ffn.fc1.bias": (hidden,),
            p + "ffn.fc2.weight": (d, hidden),
            p + "ffn.fc2.bias": (d,),
        })
        if c.shared_adaln:
            layout[p + "ada_gss"] = (1, 1, 6, d)
        else:
            layout.update({p + "ada_lin.1.weight": (6 * d, d), p + "ada_lin.1.bias": (6 * d,)})
    return layout


def released_state(config: VARConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the authors' layout: random weights, their constant buffers with their values."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in released_layout(config).items()}
    levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(config.scales)])
    state["lvl_1L"] = levels[None]
    state["attn_bias_for_masking"] = torch.where(levels[:, None] >= levels[None, :], 0.0, -math.inf)[None, None]
    for key in state:
        if key.endswith("zero_k_bias"):
            state[key] = torch.zeros_like(state[key])
    return state


CONSTANT_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


@pytest.mark.parametrize("name", ["var-d16", "var-d30", "var-d36"])
def test_our_layout_is_theirs_minus_the_constant_buffers(name):
    config = get_var_preset(name)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VAR(config).state_dict().items()}
    theirs = {k: s for k, s in released_layout(config).items() if not k.endswith(CONSTANT_BUFFERS)}
    assert ours == theirs


@pytest.mark.parametrize("shared", [False, True])
def test_released_file_loads_strictly(tmp_path, shared):
    config = small_config(shared_adaln=shared, num_classes=1000)
    state = released_state(config)
    path = tmp_path / "var_small.pth"
    torch.save(state, path)
    model = VAR.from_released(path, config)
    assert not model.training
    ours = model.state_dict()
    assert set(ours) == {k for k in state if not k.endswith(CONSTANT_BUFFERS)}
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key


def test_released_file_mismatch_lists_the_keys(tmp_path):
    config = small_config(num_classes=1000)
    state = released_state(config)
    del state["blocks.1.ffn.fc2.bias"]
    state["blocks.1.ffn.fc3.weight"] = torch.zeros(2)
    state["head.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        VAR.from_released(tmp_path / "bad.pth", config)
    message = str(err.value)
    assert "missing: blocks.1.ffn.fc2.bias" in message
    assert "unexpected: blocks.1.ffn.fc3.weight" in message
    assert "head.bias: checkpoint (7,)" in message


@pytest.mark.parametrize(
    "key, corrupt",
    [
        ("attn_bias_for_masking", lambda t: t.fill_(0.0)),  # no longer causal
        ("lvl_1L", lambda t: t.flip(-1)),
        ("blocks.0.attn.zero_k_bias", lambda t: t.fill_(0.5)),
    ],
)
def test_released_constant_buffers_are_checked(key, corrupt):
    config = small_config(num_classes=1000)
    state = released_state(config)
    state[key] = corrupt(state[key].clone())
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        convert_released_var_state_dict(state, config)


class Payload:
    """A pickled object that weights_only loading must refuse."""


def test_released_file_is_read_without_unpickling_code(tmp_path):
    torch.save({"weights": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth holds Python objects"):
        VAR.from_released(tmp_path / "evil.pth", small_config())
    with pytest.raises(FileNotFoundError):
        VAR.from_released(tmp_path / "absent.pth", small_config())


# ---------------------------------------------------------------------------------------- the transformer
def test_block_causal_later_scales_never_change_earlier_logits(tokenizer):
    model = small_model()
    c = model.config
    inputs = tokenizer.teacher_forcing_inputs(random_indices(c, 2))
    labels = torch.tensor([3, 7])
    base = model.logits(inputs, labels)
    segments = scale_segments(c.scales)
    for k in range(1, len(c.scales)):
        start, end = segments[k]
        changed_inputs = inputs.clone()
        changed_inputs[:, start - c.first_len:end - c.first_len] += 1.0
        changed = model.logits(changed_inputs, labels)
        torch.testing.assert_close(changed[:, :start], base[:, :start], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[:, start:end], base[:, start:end], atol=1e-3)


def test_scale_prefix_equals_the_full_sequence(tokenizer):
    """Running only the first scales gives their logits in the full pass: nothing leaks backwards."""
    model = small_model()
    c = model.config
    inputs = tokenizer.teacher_forcing_inputs(random_indices(c, 2))
    labels = torch.tensor([1, 2])
    full = model.logits(inputs, labels)
    ce = model.class_emb(labels)
    for k in range(len(c.scales)):
        end = scale_segments(c.scales)[k][1]
        tokens = model.embed_inputs(ce, inputs[:, : end - c.first_len])
        hidden = model.transformer(tokens, model.block_modulation(ce), sides=c.scales[: k + 1])
        torch.testing.assert_close(model.head_logits(hidden, ce), full[:, :end], rtol=1e-5, atol=1e-5)


def test_attention_scale_is_capped_at_100(tokenizer):
    model = small_model()
    inputs = tokenizer.teacher_forcing_inputs(random_indices(model.config, 1))
    scale = model.blocks[0].attn.scale_mul_1H11
    with torch.no_grad():
        scale.fill_(math.log(100.0))
        at_cap = model.logits(inputs, [4])
        scale.fill_(math.log(1000.0))
        above = model.logits(inputs, [4])
        scale.fill_(math.log(20.0))
        below = model.logits(inputs, [4])
    torch.testing.assert_close(above, at_cap, rtol=0, atol=1e-6)
    assert not torch.allclose(below, at_cap, atol=1e-3)
    fresh = VAR(small_config()).blocks[0].attn.scale_mul_1H11  # initialised at log(4)
    torch.testing.assert_close(fresh.exp(), torch.full((1, 4, 1, 1), 4.0))


def test_label_drop_means_the_null_class(tokenizer):
    model = small_model()
    inputs = tokenizer.teacher_forcing_inputs(random_indices(model.config, 3))
    plain = model.logits(inputs, [1, 2, 3])
    dropped = model.logits(inputs, [1, 2, 3], drop_mask=torch.tensor([False, True, False]))
    torch.testing.assert_close(dropped[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(dropped[1], plain[1], atol=1e-4)
    with torch.no_grad():  # class 2 made to embed like the null class: its logits become the dropped ones
        model.class_emb.weight[2] = model.class_emb.weight[model.null_class]
    torch.testing.assert_close(model.logits(inputs, [1, 2, 3])[1], dropped[1])


def test_drop_path_scales_the_kept_branches(tokenizer):
    """Training mode with every branch kept multiplies block i's branches by 1 / (1 - rate_i)."""
    model = small_model(drop_path=0.5)  # rates 0 and 0.5 for the two blocks
    inputs = tokenizer.teacher_forcing_inputs(random_indices(model.config, 2))
    keep = torch.ones(2, 2, 2, dtype=torch.bool)
    model.train()
    trained = model.logits(inputs, [0, 1], keep=keep)
    none_kept = model.logits(inputs, [0, 1], keep=torch.zeros_like(keep))
    model.eval()
    with torch.no_grad():  # the gates are rows [0, 2D) of ada_lin: doubling them doubles both branches
        width = model.config.width
        model.blocks[1].ada_lin[1].weight[: 2 * width] *= 2
        model.blocks[1].ada_lin[1].bias[: 2 * width] *= 2
    torch.testing.assert_close(trained, model.logits(inputs, [0, 1]), rtol=1e-4, atol=1e-5)
    ce = model.class_emb(torch.tensor([0, 1]))
    skipped = model.head_logits(model.embed_inputs(ce, inputs), ce)  # every block the identity
    torch.testing.assert_close(none_kept, skipped, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- sampling
def _record_mixed_logits(monkeypatch) -> list:
    """The guided logits of each scale, as the categorical head hands them to the filter."""
    seen = []
    original = categorical_module.filter_logits

    def recording(logits, **kwargs):
        seen.append(logits.clone())
        return original(logits, **kwargs)

    monkeypatch.setattr(categorical_module, "filter_logits", recording)
    return seen


def _sample_without_cache(model, tokenizer, labels, *, cfg, top_k, top_p, generator):
    """Recompute the whole prefix with block-causal attention at every scale (no KV cache); cfg is VAR's own
    (t_max of (1 + t) cond - t uncond, 0 unguided)."""
    c = model.config
    batch = len(labels)
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if cfg else labels
    ce = model.class_emb(rows)
    modulation = model.block_modulation(ce)
    indices, mixed, inputs, f_hat = [], [], None, None
    for k, side in enumerate(c.scales):
        tokens = model.embed_inputs(ce, inputs)
        hidden = model.transformer(tokens, modulation, sides=c.scales[: k + 1])
        start, end = scale_segments(c.scales)[k]
        logits = model.head_logits(hidden[:, start:end], ce)
        if cfg:
            logits = cfg_mix(logits[:batch], logits[batch:], cfg * k / (len(c.scales) - 1))
        mixed.append(logits)
        indices.append(sample_tokens(logits, top_k=top_k, top_p=top_p, generator=generator).view(batch, side, side))
        f_hat, nxt = tokenizer.accumulate(k, f_hat, indices[-1])
        if nxt is not None:
            nxt = torch.cat([nxt, nxt]) if cfg else nxt
            inputs = nxt if inputs is None else torch.cat([inputs, nxt], dim=1)
    return indices, mixed, f_hat


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(shared_adaln=True), dict(attn_l2_norm=False), dict(scales=(2, 3, 4), num_classes=5)],
    ids=["default", "shared-adaln", "no-l2-norm", "first-scale-2x2"],
)
def test_kv_cache_sampling_equals_full_recompute(monkeypatch, overrides):
    torch.manual_seed(0)
    tok = MultiScaleVQVAE(get_msvq_preset("tiny", scales=overrides.get("scales", (1, 2, 3, 4)))).eval()
    model = small_model(**overrides)
    labels = torch.tensor([1, 4, 2])
    seen = _record_mixed_logits(monkeypatch)
    with torch.no_grad():
        out = model.sample(labels, tokenizer=tok, var_cfg=2.0, top_k=10, top_p=0.9,
                           generator=torch.Generator().manual_seed(3))
        seen = list(seen)  # the reference below filters through the same function
        indices, mixed, f_hat = _sample_without_cache(model, tok, labels, cfg=2.0, top_k=10, top_p=0.9,
                                                      generator=torch.Generator().manual_seed(3))
    assert [tuple(i.shape) for i in out.indices] == [(3, s, s) for s in model.config.scales]
    assert len(seen) == len(indices)
    for k in range(len(indices)):
        torch.testing.assert_close(seen[k], mixed[k], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.indices[k], indices[k])
    torch.testing.assert_close(out.f_hat, f_hat)
    torch.testing.assert_close(out.f_hat, tok.indices_to_f_hat(out.indices), rtol=1e-5, atol=1e-5)


def _teacher_forced_logits(model, tokenizer, indices, labels):
    inputs = tokenizer.teacher_forcing_inputs(indices)
    cond = model.logits(inputs, labels)
    uncond = model.logits(inputs, labels, drop_mask=torch.ones(len(labels), dtype=torch.bool))
    return cond, uncond


def test_var_ramp_starts_at_the_conditional_logits_and_ends_at_cfg(monkeypatch, tokenizer):
    """VAR's cfg 3 (guidance_scale 4): t = 3 k / (K - 1) in (1 + t) cond - t uncond."""
    model = small_model()
    c = model.config
    labels = torch.tensor([2, 9])
    seen = _record_mixed_logits(monkeypatch)
    with torch.no_grad():
        guided = model.sample(labels, tokenizer=tokenizer, var_cfg=3.0, generator=torch.Generator().manual_seed(0))
        cond, uncond = _teacher_forced_logits(model, tokenizer, guided.indices, labels)
    segments = scale_segments(c.scales)
    # VAR's ramp is the engine's excess over 1 of guidance_scale = 1 + cfg
    assert [guidance_excess(4.0, k, 4, "linear") for k in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert len(seen) == len(segments)
    torch.testing.assert_close(seen[0], cond[:, : segments[0][1]], rtol=1e-5, atol=1e-5)
    for k, (start, end) in enumerate(segments):
        t = 3.0 * k / (len(c.scales) - 1)
        expected = (1 + t) * cond[:, start:end] - t * uncond[:, start:end]
        torch.testing.assert_close(seen[k], expected, rtol=1e-4, atol=1e-4)
    # the first scale is unguided: the same draws give the same first tokens without guidance at all
    unguided = model.sample(labels, tokenizer=tokenizer, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unguided.indices[0], guided.indices[0])
    assert any(not torch.equal(a, b) for a, b in zip(unguided.indices[1:], guided.indices[1:]))
    same = model.sample(labels, tokenizer=tokenizer, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(same.indices, guided.indices))


def test_constant_cfg_schedule_guides_every_scale(monkeypatch, tokenizer):
    model = small_model()
    labels = torch.tensor([2, 9])
    seen = _record_mixed_logits(monkeypatch)
    with torch.no_grad():
        out = model.sample(labels, tokenizer=tokenizer, guidance_scale=2.5, cfg_schedule="constant",
                           generator=torch.Generator().manual_seed(0))
        cond, uncond = _teacher_forced_logits(model, tokenizer, out.indices, labels)
    assert len(seen) == len(model.config.scales)
    for k, (start, end) in enumerate(scale_segments(model.config.scales)):
        expected = 2.5 * cond[:, start:end] - 1.5 * uncond[:, start:end]
        torch.testing.assert_close(seen[k], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seen[0], cond[:, :1], atol=1e-3)  # unlike the ramp, the first scale is guided


def test_same_generator_same_samples_and_another_seed_differs(tokenizer):
    model = small_model()

    def run(seed, **kw):
        return model.sample([2, 5, 5], tokenizer=tokenizer, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, other = run(11), run(11), run(12)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert torch.equal(a.f_hat, b.f_hat)
    assert any(not torch.equal(x, y) for x, y in zip(a.indices, other.indices))
    greedy_a, greedy_b = run(1, top_k=1), run(2, top_k=1)  # greedy ignores the draws
    assert all(torch.equal(x, y) for x, y in zip(greedy_a.indices, greedy_b.indices))


def test_temperature_zero_is_greedy_and_top_k_one(tokenizer):
    model = small_model()
    greedy = model.sample([1, 2], tokenizer=tokenizer, temperature=0.0)
    top1 = model.sample([1, 2], tokenizer=tokenizer, top_k=1, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(greedy.indices, top1.indices))


def test_accumulating_one_hot_code_vectors_equals_accumulating_ids(tokenizer):
    g = torch.Generator().manual_seed(0)
    f_ids = f_codes = None
    for k, side in enumerate(tokenizer.scales):
        ids = torch.randint(tokenizer.codebook_size, (2, side, side), generator=g)
        codes = torch.nn.functional.one_hot(ids, tokenizer.codebook_size).float() @ tokenizer.codebook
        f_ids, next_ids = tokenizer.accumulate(k, f_ids, ids)
        f_codes, next_codes = tokenizer.accumulate(k, f_codes, codes.permute(0, 3, 1, 2))
        torch.testing.assert_close(f_codes, f_ids, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="code vectors must be"):
        tokenizer.accumulate(0, None, torch.zeros(2, tokenizer.code_dim + 1, 1, 1))


def test_more_smooth_mixes_code_vectors(tokenizer):
    model = small_model()
    plain = model.sample([3], tokenizer=tokenizer, generator=torch.Generator().manual_seed(0))
    smooth = model.sample([3], tokenizer=tokenizer, more_smooth=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.indices[0], smooth.indices[0])  # the id is drawn before the Gumbel noise
    assert not torch.allclose(smooth.f_hat, tokenizer.indices_to_f_hat(smooth.indices), atol=1e-4)

    class NoCodebook:  # a tokenizer that cannot mix code vectors
        scales, codebook_size, code_dim = tokenizer.scales, tokenizer.codebook_size, tokenizer.code_dim
        accumulate = tokenizer.accumulate

    with pytest.raises(ValueError, match="codebook"):
        model.sample([3], tokenizer=NoCodebook(), more_smooth=True)


def test_per_token_uniforms_make_each_image_independent_of_its_batch(tokenizer):
    model = small_model()
    g = torch.Generator().manual_seed(0)
    uniforms = [torch.rand(3, side * side, generator=g) for side in model.config.scales]
    batch = model.sample([1, 2, 3], tokenizer=tokenizer, var_cfg=1.5, noise=uniforms)
    for row in range(3):
        alone = model.sample([row + 1], tokenizer=tokenizer, var_cfg=1.5, noise=[u[row:row + 1] for u in uniforms])
        assert all(torch.equal(a[0], b[row]) for a, b in zip(alone.indices, batch.indices))
    other = model.sample([1, 2, 3], tokenizer=tokenizer, var_cfg=1.5, noise=[u.roll(1, 0) for u in uniforms])
    assert not all(torch.equal(a, b) for a, b in zip(other.indices, batch.indices))
    with pytest.raises(ValueError, match="noise .*must be a list"):
        model.sample([1, 2, 3], tokenizer=tokenizer, noise=uniforms[:-1])
    with pytest.raises(ValueError, match="more_smooth"):
        model.sample([1, 2, 3], tokenizer=tokenizer, noise=uniforms, more_smooth=True)


def test_noise_from_seeds_gives_each_row_its_own_uniforms(tokenizer):
    model = small_model()
    noise = model.noise_from_seeds([5, 6])
    assert [tuple(u.shape) for u in noise] == [(2, s * s) for s in model.config.scales]
    assert all(u.dtype == torch.float64 and u.device.type == "cpu" for u in noise)
    assert all(bool(((u >= 0) & (u < 1)).all()) for u in noise)
    assert all(torch.equal(a[1], b[0]) for a, b in zip(noise, model.noise_from_seeds([6])))  # row 1: seed 6 alone
    assert not all(torch.equal(u[0], u[1]) for u in noise)
    alone = model.sample([3], tokenizer=tokenizer, noise=model.noise_from_seeds([6]))
    pair = model.sample([4, 3], tokenizer=tokenizer, noise=noise)
    assert all(torch.equal(a[0], b[1]) for a, b in zip(alone.indices, pair.indices))


def test_unconditional_model(tokenizer):
    model = small_model(num_classes=0)
    assert model.class_emb.weight.shape[0] == 1 and model.null_class == 0
    out = model.sample(tokenizer=tokenizer, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert out.f_hat.shape == (2, 8, 4, 4)
    loss = model(out.indices, tokenizer=tokenizer).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(tokenizer=tokenizer, batch_size=2, guidance_scale=2.5)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(tokenizer=tokenizer, batch_size=2, var_cfg=1.5)
    with pytest.raises(ValueError, match="class_labels"):
        model.sample([1], tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------- training
def test_loss_is_the_mean_cross_entropy_over_all_tokens(tokenizer):
    model = small_model()
    c = model.config
    indices = random_indices(c, 3)
    out = model(indices, [0, 1, 2], tokenizer=tokenizer)
    logits = model.logits(tokenizer.teacher_forcing_inputs(indices), [0, 1, 2])
    targets = torch.cat([i.flatten(1) for i in indices], dim=1)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L)
    torch.testing.assert_close(out.loss, (per_token / c.seq_len).sum(1).mean())
    per_scale = [per_token[:, s:e].mean() for s, e in scale_segments(c.scales)]
    torch.testing.assert_close(out.loss_per_scale, torch.stack(per_scale))
    sizes = torch.tensor([s * s for s in c.scales], dtype=torch.float32)
    torch.testing.assert_close((out.loss_per_scale * sizes).sum() / sizes.sum(), out.loss.detach())
    assert not out.loss_per_scale.requires_grad and out.loss.requires_grad


def test_training_draws_come_from_the_generator(tokenizer):
    model = small_model(drop_path=0.3, cond_drop_rate=0.5)
    model.train()
    indices = random_indices(model.config, 8)
    labels = torch.arange(8)

    def loss(seed):
        return model(indices, labels, tokenizer=tokenizer, generator=torch.Generator().manual_seed(seed)).loss

    assert torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(0), loss(1))
    draws = model.draw_randomness(8, generator=torch.Generator().manual_seed(0))
    given = model(indices, labels, tokenizer=tokenizer, **draws).loss
    assert torch.equal(given, loss(0))  # forward draws exactly draw_randomness's tensors
    assert draws["keep"][:, 0].all()  # the first block's drop-path rate is 0
    many = model.draw_randomness(20000, generator=torch.Generator().manual_seed(1))
    assert abs(many["drop_mask"].float().mean().item() - 0.5) < 0.02
    assert abs(1 - many["keep"][:, 1].float().mean().item() - 0.3) < 0.02


def test_training_steps_lower_the_loss(tokenizer):
    model = small_model(cond_drop_rate=0.0)
    model.train()
    indices = random_indices(model.config, 4, seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for step in range(30):
        loss = model(indices, labels, tokenizer=tokenizer, generator=torch.Generator().manual_seed(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not any(p.grad is not None for p in tokenizer.parameters())  # the tokenizer is never trained


# ---------------------------------------------------------------------------------------- files and presets
def test_save_and_load_round_trip(tmp_path, tokenizer):
    model = small_model(shared_adaln=True)
    model.save_pretrained(tmp_path / "var")
    loaded = VAR.from_pretrained(tmp_path / "var")
    assert loaded.config == model.config and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    inputs = tokenizer.teacher_forcing_inputs(random_indices(model.config, 2))
    assert torch.equal(model.logits(inputs, [1, 2]), loaded.logits(inputs, [1, 2]))
    FlowAR(get_preset("flowar-tiny")).save_pretrained(tmp_path / "flowar")
    with pytest.raises(ValueError, match="'flowar' model, not 'var'"):
        VAR.from_pretrained(tmp_path / "flowar")
    with pytest.raises(FileNotFoundError):
        VAR.from_pretrained(tmp_path / "nothing-here")


def test_var_tiny_matches_the_mnist_tokenizer():
    config, tok = get_var_preset("var-tiny"), get_msvq_preset("mnist")
    assert (config.scales, config.vocab_size, config.code_dim) == (tok.scales, tok.codebook_size, tok.code_dim)
    assert set(VAR_PRESETS) >= {"var-d16", "var-d20", "var-d24", "var-d30", "var-tiny"}


# ---------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(class_labels=[10]), "class_labels"),
        (dict(class_labels=None), "class_labels"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=2.0), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(var_cfg=float("nan")), "var_cfg"),
        (dict(cfg=1.5), "cfg is not a sampling option"),
        (dict(batch_size=3), "batch_size"),
    ],
)
def test_bad_sampling_arguments_name_themselves(tokenizer, kwargs, name):
    model = small_model()
    kwargs = {"class_labels": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=name):
        model.sample(kwargs.pop("class_labels"), tokenizer=tokenizer, **kwargs)


def test_bad_inputs_name_themselves(tokenizer):
    model = small_model()
    c = model.config
    indices = random_indices(c, 2)
    with pytest.raises(ValueError, match="indices"):
        model(indices[:-1], [0, 1], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="indices"):
        model([i.float() for i in indices], [0, 1], tokenizer=tokenizer)
    bad = [i.clone() for i in indices]
    bad[2][0, 0, 0] = c.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        model(bad, [0, 1], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        model(indices, [0, 1], tokenizer=MultiScaleVQVAE(get_msvq_preset("tiny", codebook_size=64)))
    with pytest.raises(ValueError, match="tokenizer"):
        model.sample([0], tokenizer=None)
    with pytest.raises(ValueError, match="inputs"):
        model.logits(torch.zeros(2, 5, c.code_dim), [0, 1])


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(width=100, num_heads=3), "width"),
        (dict(scales=(2, 1)), "scales"),
        (dict(depth=0), "depth"),
        (dict(num_classes=-1), "num_classes"),
        (dict(drop_path=1.0), "drop_path"),
        (dict(vocab_size=1), "vocab_size"),
    ],
)
def test_bad_config_fields_name_themselves(overrides, name):
    with pytest.raises(ValueError, match=name):
        VARConfig(**overrides)


def test_unknown_preset_and_config_fields():
    with pytest.raises(ValueError, match="preset"):
        get_var_preset("var-d17")
    with pytest.raises(ValueError, match="unknown fields"):
        VARConfig.from_dict({"depth": 2, "colour": "red"})
    config = get_var_preset("var-d20")
    assert VARConfig.from_dict(config.to_dict()) == config
    assert VARConfig.from_depth(20) == config
    # the authors' FID settings: cfg 1.5 (guidance_scale 2.5), top-k 900, top-p 0.96
    sampling = config.sampling
    assert (sampling.guidance_scale, sampling.var_cfg, sampling.top_k, sampling.top_p) == (2.5, 1.5, 900, 0.96)


# ---------------------------------------------------------------------------------------- the parity tool
def test_parity_tool_builds_the_presets_and_undoes_init_patches(tmp_path):
    from tools import parity_var

    for depth in (16, 20, 24, 30, 36):
        assert parity_var.reference_config(depth, small=False) == get_var_preset(f"var-d{depth}")
    original = torch.nn.Linear.reset_parameters
    with parity_var.guard_nn_init() as changed:
        torch.nn.Linear.reset_parameters = lambda self: None  # what their build_vae_var does
    assert torch.nn.Linear.reset_parameters is original and changed == ["Linear"]
    with pytest.raises(FileNotFoundError, match="models/var.py"):
        parity_var.import_reference(tmp_path)
