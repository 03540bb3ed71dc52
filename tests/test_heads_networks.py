"""Head networks: shapes, dtypes, released key layout, parameter counts, initialisation."""

import pytest
import torch

from heads.flow import sample_flow
from heads.networks import HEAD_KINDS, FlowTransformerHead, MLPHead, build_head
from heads.path import flow_matching_loss

from flow_options import guide, solve

C, W, D = 4, 128, 24  # token, width (2 attention heads of 64), condition


def _randomise(module, std=0.05, seed=0):
    """Overwrite every parameter, so the zero-initialised output layer does not hide the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def _inputs(batch=2, n=16, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, C, generator=gen).to(dtype)
    t = torch.rand(batch, generator=gen)
    cond = torch.randn(batch, n, D, generator=gen).to(dtype)
    return x, t, cond


def _linear(prefix, bias=True):
    return {f"{prefix}.weight"} | ({f"{prefix}.bias"} if bias else set())


def _common_keys():
    return (
        _linear("time_embed.mlp.0") | _linear("time_embed.mlp.2") | _linear("cond_embed") | _linear("input_proj")
        | _linear("final_layer.linear") | _linear("final_layer.adaLN_modulation.1")
    )


def _mlp_keys(prefix):
    return _linear(f"{prefix}.fc1_g") | _linear(f"{prefix}.fc1_x") | _linear(f"{prefix}.fc2")


def test_v1_state_dict_keys_match_released_layout():
    head = FlowTransformerHead(C, W, D, 1, variant="v1")
    expected = _common_keys() | {
        "res_blocks.0.attn.qkv.weight",  # no qkv bias in the head
        "res_blocks.0.attn.rope.freqs",
        *_linear("res_blocks.0.attn.proj"),
        *_mlp_keys("res_blocks.0.mlp"),
        *_linear("res_blocks.0.ada_lin"),
    }
    assert set(head.state_dict()) == expected
    assert head.state_dict()["res_blocks.0.ada_lin.weight"].shape == (6 * W, W)
    assert head.state_dict()["res_blocks.0.mlp.fc1_g.weight"].shape == (int(8 * W / 3), W)
    assert head.state_dict()["res_blocks.0.attn.rope.freqs"].shape == (16,)  # head_dim 64 -> 16 per axis


def test_v2_state_dict_keys_match_released_layout():
    head = FlowTransformerHead(C, W, D, 1, variant="v2")
    expected = _common_keys() | {
        "res_blocks.0.attn.qkv.weight",
        "res_blocks.0.attn.rope.freqs",
        *_linear("res_blocks.0.attn.proj"),
        "res_blocks.0.crossattn.q.weight",
        "res_blocks.0.crossattn.kv.weight",
        "res_blocks.0.crossattn.rope.freqs",
        *_linear("res_blocks.0.crossattn.proj"),
        "res_blocks.0.norm2_1.weight",
        "res_blocks.0.norm2_2.weight",
        *_mlp_keys("res_blocks.0.mlp"),
        *_linear("res_blocks.0.ada_lin_attn"),
        *_linear("res_blocks.0.ada_lin_mlp"),
    }
    assert set(head.state_dict()) == expected
    sd = head.state_dict()
    assert sd["res_blocks.0.crossattn.kv.weight"].shape == (2 * W, D)
    assert sd["res_blocks.0.norm2_2.weight"].shape == (D,)
    assert sd["res_blocks.0.ada_lin_attn.weight"].shape == (3 * W, W)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_of_released_heads():
    with torch.device("meta"):
        small = FlowTransformerHead(16, 1024, 768, 2, variant="v1")
        large = FlowTransformerHead(16, 1024, 1024, 12, variant="v2")
    assert abs(_count(small) - 42.0e6) / 42.0e6 < 0.005
    # FlowAR-L is 586.9M in all; its AR part (8 + 8 blocks at D=1024) is 305.4M.
    assert abs(_count(large) - 281.5e6) / 281.5e6 < 0.005


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_fresh_head_outputs_zeros(kind):
    head = build_head(kind, token_dim=C, width=W, cond_dim=D, depth=2)
    out = head(*_inputs())
    assert out.shape == (2, 16, C)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_output_shape_and_dtype_follow_input(kind):
    head = _randomise(build_head(kind, token_dim=C, width=W, cond_dim=D, depth=2))
    x, t, cond = _inputs()
    out = head(x, t, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.abs().mean() > 1e-3

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp = head(x, t, cond)
    assert out_amp.dtype == torch.float32
    assert torch.isfinite(out_amp).all()
    assert (out_amp - out).abs().max() < 0.1 * out.abs().max()

    half = head.to(torch.bfloat16)(x.bfloat16(), t, cond.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - out).abs().max() < 0.1 * out.abs().max()


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_transformer_head_mixes_tokens_and_handles_all_scales(variant):
    head = _randomise(FlowTransformerHead(C, W, D, 2, variant=variant))
    for side in (1, 2, 4):
        x, t, cond = _inputs(n=side * side)
        assert head(x, t, cond).shape == (2, side * side, C)
    x, t, cond = _inputs(n=16)
    x2 = x.clone()
    x2[:, 5] += 1.0
    delta = (head(x2, t, cond) - head(x, t, cond)).abs()
    assert delta[:, 0].max() > 1e-6  # attention carries token 5's change to token 0


def test_transformer_head_quantises_time_like_the_release():
    head = _randomise(FlowTransformerHead(C, W, D, 1, variant="v1"))
    x, _, cond = _inputs()
    out = lambda t: head(x, torch.full((2,), t), cond)  # noqa: E731
    # int(1000 t) is 500 for both of these, 501 for the last
    assert torch.equal(out(0.5001), out(0.5009))
    assert not torch.equal(out(0.5001), out(0.5012))


def test_mlp_head_is_per_token_and_continuous_in_time():
    head = _randomise(MLPHead(C, W, D, 3))
    x, t, cond = _inputs(n=7)  # any N, not only squares
    x2, cond2 = x.clone(), cond.clone()
    x2[:, 3] += 1.0
    cond2[:, 3] -= 1.0
    base, moved = head(x, t, cond), head(x2, t, cond2)
    others = [i for i in range(7) if i != 3]
    assert torch.equal(base[:, others], moved[:, others])
    assert (base[:, 3] - moved[:, 3]).abs().max() > 1e-4
    assert not torch.equal(head(x, t + 1e-4, cond), base)


def test_head_trains_through_the_flow_loss():
    head = FlowTransformerHead(C, W, D, 1, variant="v2")
    x, _, cond = _inputs()
    g = torch.Generator().manual_seed(0)
    loss = flow_matching_loss(head, x, cond, t=torch.rand(x.shape[0], generator=g),
                              noise=torch.randn(x.shape, generator=g)).mean()
    loss.backward()
    # Only the zero-initialised output layer gets a gradient at step 0; it must not be zero.
    assert head.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_every_head_owns_its_loss_and_sampler(kind):
    """head.loss is the flow-matching loss of heads.path and head.sample is sample_flow, on the head itself."""
    head = _randomise(build_head(kind, token_dim=C, width=W, cond_dim=D, depth=1)).eval()
    x, t, cond = _inputs()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    loss = head.loss(x, cond, t=t, noise=noise)
    assert loss.shape == (2,)
    assert torch.equal(loss, flow_matching_loss(head, x, cond, t=t, noise=noise))
    null = torch.randn(cond.shape, generator=torch.Generator().manual_seed(6))
    guidance = guide(null, 2.0, (0.0, 0.5))
    out = head.sample(noise, cond, solve(steps=4, schedule="uniform"), guidance=guidance)
    ref = sample_flow(head, noise, cond, solve(steps=4, schedule="uniform"), guidance=guidance)
    assert torch.equal(out.x, ref.x) and (out.nfe, out.rows) == (ref.nfe, ref.rows) == (4, 2 * 16 * (2 + 2 * 2))
    assert (out.x - noise).abs().max() > 1e-3


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="kind") as err:
        build_head("unet", token_dim=C, width=W, cond_dim=D, depth=1)
    assert "transformer-v1" in str(err.value) and "mlp" in str(err.value)
    with pytest.raises(ValueError, match="variant"):
        FlowTransformerHead(C, W, D, 1, variant="v3")
    with pytest.raises(ValueError, match="width"):
        FlowTransformerHead(C, 96, D, 1)
    head = FlowTransformerHead(C, W, D, 1)
    x, t, cond = _inputs(n=6)
    with pytest.raises(ValueError, match="square"):
        head(x, t, cond)
    x, t, cond = _inputs(n=4)
    with pytest.raises(ValueError, match="cond"):
        head(x, t, cond[:, :2])


def turn_pairs(x, cos, sin):
    """RoPE written out: each adjacent channel pair (a, b) of x turned by its angle (the tables repeat each
    pair's cos and sin)."""
    a, b, c, s = x[..., 0::2], x[..., 1::2], cos[..., 0::2], sin[..., 0::2]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_turns_each_channel_pair_by_its_angle_eager_and_compiled(dtype):
    """apply_rope on a strided query view, as the attention layers pass it: eager (a complex product) and traced
    by torch.compile (the real form inductor fuses) both give the written-out rotation, in the input's dtype,
    and keep each pair's length."""
    from heads.layers import Rope2D, apply_rope

    cos, sin = Rope2D(64).tables(((4, 4),), "cpu")
    qkv = torch.randn(2, 16, 3 * 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = qkv.view(2, 16, 3, 2, 64).permute(2, 0, 3, 1, 4)[0]  # (B, H, N, head_dim), not contiguous
    expected = turn_pairs(q.double(), cos.double(), sin.double())
    torch._dynamo.reset()
    compiled = torch.compile(apply_rope, backend="eager", fullgraph=True)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for out in (apply_rope(q, cos, sin), compiled(q, cos, sin)):
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), expected, **tolerance)
        lengths = out.double().unflatten(-1, (-1, 2)).norm(dim=-1)
        torch.testing.assert_close(lengths, q.double().unflatten(-1, (-1, 2)).norm(dim=-1), **tolerance)
    assert (expected - q.double()).abs().max() > 0.5  # the tables turn most pairs


def _manual_forward(sd, x, t, cond, variant):
    """The released head's forward for depth 1, written out from its state dict with plain torch ops."""
    import torch.nn.functional as F

    from heads.layers import Rope2D, timestep_embedding

    lin = lambda name, v: F.linear(v, sd[f"{name}.weight"], sd.get(f"{name}.bias"))  # noqa: E731
    rms = lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    B_, N, _ = x.shape
    heads = W // 64
    rope = Rope2D(64)
    cos, sin = rope.tables((int(N ** 0.5),), x.device)

    def attention(q, k, v):
        split = lambda z: z.view(B_, N, heads, 64).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        q, k = turn_pairs(q, cos, sin), turn_pairs(k, cos, sin)
        w = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        return (w @ v).transpose(1, 2).reshape(B_, N, W)

    h = lin("input_proj", x)
    te = lin("time_embed.mlp.2", F.silu(lin("time_embed.mlp.0", timestep_embedding((t * 1000).long(), 256))))
    te = te[:, None]
    c = lin("cond_embed", cond)
    b = "res_blocks.0."

    def self_attn(z):
        q, k, v = lin(b + "attn.qkv", z).split(W, dim=-1)
        return lin(b + "attn.proj", attention(q, k, v))

    def mlp(z):
        return lin(b + "mlp.fc2", F.gelu(lin(b + "mlp.fc1_g", z)) * lin(b + "mlp.fc1_x", z))

    if variant == "v1":
        g1, g2, s1, s2, b1, b2 = lin(b + "ada_lin", F.silu(te + c)).split(W, dim=-1)
        h = h + self_attn(rms(h) * (1 + s1) + b1) * g1
        h = h + mlp(rms(h) * (1 + s2) + b2) * g2
    else:
        g1, s1, b1 = lin(b + "ada_lin_attn", F.silu(te)).split(W, dim=-1)
        g2, s2, b2 = lin(b + "ada_lin_mlp", F.silu(c + te)).split(W, dim=-1)
        h = h + self_attn(rms(h) * (1 + s1) + b1) * g1
        q = lin(b + "crossattn.q", rms(h) * sd[b + "norm2_1.weight"])
        k, v = lin(b + "crossattn.kv", rms(cond) * sd[b + "norm2_2.weight"]).split(W, dim=-1)
        h = h + lin(b + "crossattn.proj", attention(q, k, v))
        h = h + mlp(rms(h) * (1 + s2) + b2) * g2
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(c + te)).split(W, dim=-1)
    return lin("final_layer.linear", rms(h) * (1 + scale) + shift)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_transformer_head_matches_written_out_release_forward(variant):
    """Pins the chunk order of the modulations and where each norm sits (the key set cannot)."""
    head = _randomise(FlowTransformerHead(C, W, D, 1, variant=variant), std=0.1)
    with torch.no_grad():  # gains away from 1, so a misplaced norm weight shows
        for name, p in head.named_parameters():
            if "norm" in name:
                p.copy_(1 + torch.rand_like(p))
    x, t, cond = _inputs()
    with torch.no_grad():
        ours = head(x, t, cond)
        manual = _manual_forward(head.state_dict(), x, t, cond, variant)
    assert ours.abs().mean() > 1e-2
    torch.testing.assert_close(ours, manual, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_conditioned_head_is_the_head_and_does_its_condition_work_once_per_solve(kind):
    """head.conditioned(cond)(x, t) is head(x, t, cond) bit for bit; a guided solve embeds each condition (and
    in v2 computes each block's cross-attention keys and values) once, not at every one of its steps."""
    head = _randomise(build_head(kind, token_dim=C, width=W, cond_dim=D, depth=2)).eval()
    x, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(head.conditioned(cond)(x, t), head(x, t, cond))
    calls = []
    layers = [head.cond_embed] + [block.crossattn.kv for block in getattr(head, "res_blocks", [])
                                  if hasattr(block, "crossattn")]
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: calls.append(module))
    null = torch.randn(cond.shape, generator=torch.Generator().manual_seed(6))
    out = head.sample(torch.randn(x.shape), cond, solve(steps=6, schedule="uniform"), guidance=guide(null, 2.0, (0.0, 0.5)))
    assert out.nfe == 6
    # Two conditions fixed (the conditional batch and the doubled guided batch), each once per layer.
    assert len(calls) == 2 * len(layers) and set(map(id, calls)) == set(map(id, layers))
    with pytest.raises(ValueError, match="cond must be"):
        head.conditioned(cond[..., :-1])
