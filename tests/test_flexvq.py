"""FlexVAR's tokenizer (vae.flexvq): config, the authors' file layout, the cosine search, the transformer's inputs."""

import json

import pytest
import torch
import torch.nn.functional as F

from tools import parity_flexvar_tokenizer as parity
from vae import LatentAutoencoder
from vae.flexvq import (FLEXVQ_PRESETS, FlexVQConfig, FlexVQVAE, convert_released_flexvq_state_dict,
                        get_flexvq_preset)

# Counted on the authors' VQ_16(codebook_size=8912, codebook_embed_dim=32) by tools/parity_flexvar_tokenizer.py.
RELEASE_PARAMS = 72_049_827


def mnist(seed: int = 0) -> FlexVQVAE:
    torch.manual_seed(seed)
    model = FlexVQVAE(get_flexvq_preset("mnist")).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrongly loaded one changes the outputs
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif p.ndim == 1:
                p.normal_(1, 0.1)
    return model


def images(model: FlexVQVAE, *, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = model.image_size
    return torch.rand(batch, model.config.image_channels, side, side, generator=g) * 2 - 1


def features(model: FlexVQVAE, *, batch: int = 3, side: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = model.latent_side if side is None else side
    return torch.randn(batch, model.code_dim, side, side, generator=g)


def authors_keys(config: FlexVQConfig) -> dict[str, tuple]:
    """The parameter names and shapes of LlamaGen's VQModel (FlexVAR's models/vq_llama.py) for ``config``,
    written out from their layout: ``conv_blocks.{level}.res.{i}`` / ``.attn.{i}`` (q, k, v, proj_out) /
    ``.downsample.conv`` or ``.upsample.conv``, ``mid.{0,1,2}``, the decoder's levels from the lowest resolution."""
    keys = {}

    def conv(name, cin, cout, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attention(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def middle(name, c):
        resnet(f"{name}.0", c, c)
        attention(f"{name}.1", c)
        resnet(f"{name}.2", c, c)

    ch, mult, n, last = config.ch, config.ch_mult, config.num_res_blocks, len(config.ch_mult) - 1
    conv("encoder.conv_in", config.image_channels, ch, 3)
    width = ch
    for level, m in enumerate(mult):
        for i in range(n):
            resnet(f"encoder.conv_blocks.{level}.res.{i}", width, ch * m)
            width = ch * m
            if level == last:
                attention(f"encoder.conv_blocks.{level}.attn.{i}", width)
        if level != last:
            conv(f"encoder.conv_blocks.{level}.downsample.conv", width, width, 3)
    middle("encoder.mid", width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", width, config.z_channels, 3)
    conv("decoder.conv_in", config.z_channels, width, 3)
    middle("decoder.mid", width)
    for j, level in enumerate(reversed(range(len(mult)))):
        for i in range(n + 1):
            resnet(f"decoder.conv_blocks.{j}.res.{i}", width, ch * mult[level])
            width = ch * mult[level]
            if level == last:
                attention(f"decoder.conv_blocks.{j}.attn.{i}", width)
        if level != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", width, config.image_channels, 3)
    keys["quantize.embedding.weight"] = (config.codebook_size, config.code_dim)
    conv("quant_conv", config.z_channels, config.code_dim, 1)
    conv("post_quant_conv", config.code_dim, config.z_channels, 1)
    return keys


def released_state(model: FlexVQVAE) -> dict:
    """``model``'s weights as the authors' file holds them: their keys, plus their 65536-entry usage buffer."""
    expected = authors_keys(model.config)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    return {**state, "quantize.codebook_used": torch.zeros(65536)}


# ------------------------------------------------------------------------------------------------ config
def test_config_presets_and_validation_name_the_field():
    flexvae, small = get_flexvq_preset("flexvae"), get_flexvq_preset("mnist")
    assert (flexvae.codebook_size, flexvae.code_dim, flexvae.z_channels) == (8912, 32, 256)
    assert (flexvae.downsample, flexvae.latent_side) == (16, 16)
    assert (small.downsample, small.latent_side, small.image_size) == (4, 8, 32)
    assert get_flexvq_preset("mnist", codebook_size=32).codebook_size == 32
    assert FLEXVQ_PRESETS["mnist"].codebook_size == 64  # a preset is copied, not changed
    for field, value in [("ch", 0), ("num_res_blocks", -1), ("z_channels", 2.5), ("codebook_size", True),
                         ("code_dim", 0), ("image_size", 0), ("image_channels", 0), ("norm_groups", 0)]:
        with pytest.raises(ValueError, match=field):
            get_flexvq_preset("mnist", **{field: value})
    with pytest.raises(ValueError, match="ch_mult"):
        get_flexvq_preset("mnist", ch_mult=())
    for ch_mult in ((1, 0), 2, (1, 2.0)):
        with pytest.raises(ValueError, match="ch_mult"):
            get_flexvq_preset("mnist", ch_mult=ch_mult)
    with pytest.raises(ValueError, match="norm_groups"):
        get_flexvq_preset("mnist", norm_groups=5)
    with pytest.raises(ValueError, match="image_size"):
        get_flexvq_preset("mnist", image_size=30)
    with pytest.raises(ValueError, match="name"):
        get_flexvq_preset("vq-16")
    with pytest.raises(ValueError, match="config"):
        FlexVQVAE(get_flexvq_preset("mnist").to_dict())


def test_released_layout_has_the_authors_names_and_parameter_count():
    with torch.device("meta"):
        model = FlexVQVAE(get_flexvq_preset("flexvae"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == authors_keys(model.config)
    assert sum(p.numel() for p in model.parameters()) == RELEASE_PARAMS
    assert isinstance(model, LatentAutoencoder)
    assert (model.latent_channels, model.downsample, model.scaling_factor, model.shift_factor) == (32, 16, 1.0, 0.0)
    assert (model.codebook_size, model.code_dim, model.image_size, model.latent_side) == (8912, 32, 256, 16)


# ------------------------------------------------------------------------------------------------ files
@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    model = mnist()
    x = images(model)
    folder = model.save_pretrained(tmp_path / "tok")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "flexvq"
    loaded = FlexVQVAE.from_pretrained(folder)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.encode_features(x), model.encode_features(x))
    ids = model.encode_indices(x, [1, 3, 8])
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode_indices(x, [1, 3, 8]), ids))
    assert torch.equal(loaded.decode_indices(ids[-1]), model.decode_indices(ids[-1]))


@torch.no_grad()
def test_from_released_reads_the_authors_layout_and_names_wrong_keys(tmp_path):
    model = mnist()
    state = released_state(model)
    assert "quantize.codebook_used" not in convert_released_flexvq_state_dict(state)
    path = tmp_path / "FlexVAE.pth"
    torch.save({"model": state, "steps": torch.tensor(7)}, path)
    loaded = FlexVQVAE.from_released(path, "mnist")
    assert not loaded.training
    assert "codebook_used" not in " ".join(loaded.state_dict())
    x = images(model)
    assert torch.equal(loaded.encode_features(x), model.encode_features(x))
    codes = model.embed(torch.tensor([[[0, 5], [63, 7]]]))
    assert torch.equal(loaded.decode(codes), model.decode(codes))

    wrong = dict(state)
    wrong["encoder.mid.1.qkv.weight"] = wrong.pop("encoder.mid.1.q.weight")
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"missing: encoder\.mid\.1\.q\.weight.*unexpected: encoder\.mid\.1\.qkv"):
        FlexVQVAE.from_released(tmp_path / "wrong.pth", "mnist")
    with pytest.raises(ValueError, match="shape mismatch: quantize.embedding.weight"):
        FlexVQVAE.from_released(path, get_flexvq_preset("mnist", codebook_size=32))
    with pytest.raises(ValueError, match="preset"):
        FlexVQVAE.from_released(path, "vq-16")
    with pytest.raises(ValueError, match="preset"):
        FlexVQVAE.from_released(path, 3)
    with pytest.raises(FileNotFoundError, match="path"):
        FlexVQVAE.from_released(tmp_path / "absent.pth", "mnist")


# ------------------------------------------------------------------------------------------------ search
@torch.no_grad()
def test_quantize_picks_the_code_of_highest_cosine_similarity():
    model = mnist()
    f = features(model, batch=4) * torch.rand(4, 1, 1, 1) * 10  # the vectors' length must not matter
    ids = model.quantize_features(f, model.latent_side)
    assert ids.shape == (4, 8, 8) and ids.dtype == torch.long
    vectors = F.normalize(f.double().permute(0, 2, 3, 1).reshape(-1, model.code_dim), dim=-1)
    cos = vectors @ F.normalize(model.quantize.embedding.weight.double(), dim=-1).t()  # (N, V)
    best = cos.max(1).values
    assert torch.all(best - cos.gather(1, ids.reshape(-1, 1))[:, 0] < 1e-6)
    top2 = cos.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(ids.reshape(-1)[clear], cos.argmax(1)[clear])
    assert ids.unique().numel() > 20  # the check covers many codes
    # Scaling the codebook rows does not change the search either.
    model.quantize.embedding.weight.mul_(torch.rand(model.codebook_size, 1) * 5 + 0.1)
    agree = model.quantize_features(f, model.latent_side).reshape(-1)[clear] == ids.reshape(-1)[clear]
    assert agree.all()


@torch.no_grad()
def test_near_ties_break_as_the_authors_squared_distance_does():
    """The authors take argmin of |z|^2 + |e|^2 - 2 z.e over unit vectors in float32; with several scaled copies
    of each code direction the per-code rounding of |e|^2 decides, and argmax of z.e would pick differently."""
    model = FlexVQVAE(get_flexvq_preset("mnist", codebook_size=256))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, model.code_dim, generator=g)
    copies = base[:, None] * torch.tensor([1.0, 3.0, 0.1, 7.77])[None, :, None]
    model.quantize.embedding.weight.copy_(copies.reshape(256, model.code_dim))
    picks = torch.randint(0, 64, (4 * 32 * 32,), generator=g)
    z = base[picks] * (torch.rand(picks.numel(), 1, generator=g) * 5) + 1e-4 * torch.randn(picks.numel(), model.code_dim,
                                                                                        generator=g)
    f = z.reshape(4, 32, 32, model.code_dim).permute(0, 3, 1, 2)  # (B, C, S, S), row-major positions
    ids = model.quantize_features(f, 32).reshape(-1)

    zn = F.normalize(z, p=2, dim=-1)
    en = F.normalize(model.quantize.embedding.weight, p=2, dim=-1)
    theirs = ((zn ** 2).sum(1, keepdim=True) + (en ** 2).sum(1) - 2 * (zn @ en.t())).argmin(1)
    assert torch.equal(ids, theirs)
    assert (ids != (zn @ en.t()).argmax(1)).sum() > 100  # the construction does produce near-ties

    # Exact ties (a duplicated code) go to the lower id.
    v = torch.randn(model.code_dim, generator=g)
    model.quantize.embedding.weight[5] = model.quantize.embedding.weight[200] = v
    assert int(model.quantize_features(v.reshape(1, -1, 1, 1) * 2, 1)) == 5


@torch.no_grad()
def test_area_resize_and_scale_lists():
    model = mnist()
    f = features(model, batch=4, seed=1)
    pooled = F.avg_pool2d(f, 2)  # 8 -> 4 by area is the mean of each 2x2 block
    down = model.quantize_features(f, 4)
    assert torch.equal(down, model.quantize_features(pooled, 4))
    cos = F.normalize(pooled.double().permute(0, 2, 3, 1).reshape(-1, model.code_dim), dim=-1) @ \
        F.normalize(model.quantize.embedding.weight.double(), dim=-1).t()
    assert torch.equal(down.reshape(-1), cos.argmax(1))
    # The feature side itself is taken as it is; a list of sides gives one map per side.
    assert torch.equal(model.quantize_features(f, 8), model.quantize_features(f.clone(), 8))
    listed = model.indices_from_features(f, [2, 4, 8])
    assert [tuple(t.shape) for t in listed] == [(4, 2, 2), (4, 4, 4), (4, 8, 8)]
    assert torch.equal(listed[1], down)
    # A 1x1 side is the mean vector's code.
    assert torch.equal(model.quantize_features(f, 1), model.quantize_features(f.mean((2, 3), keepdim=True), 1))

    x = images(model)
    from_images = model.encode_indices(x, [1, 2, 5, 7, 8])
    from_features = model.indices_from_features(model.encode(x), [1, 2, 5, 7, 8])
    assert all(torch.equal(a, b) for a, b in zip(from_images, from_features))
    assert torch.equal(model.encode(x), model.encode_features(x))


# ------------------------------------------------------------------------------------------------ inputs
@torch.no_grad()
def test_embed_and_next_input():
    model = mnist()
    ids = torch.tensor([[[3, 0], [63, 3]], [[1, 2], [5, 4]]])
    codes = model.embed(ids)
    assert codes.shape == (2, model.code_dim, 2, 2)
    unit = model.quantize.embedding.weight / model.quantize.embedding.weight.norm(dim=1, keepdim=True)
    assert torch.allclose(codes[0, :, 1, 0], unit[63], atol=1e-6)
    assert torch.allclose(model.codebook.norm(dim=1), torch.ones(model.codebook_size), atol=1e-6)
    # Tokens are row-major: at its own side the input is the code map itself, token y * s + x.
    same = model.next_input(ids, 2)
    assert same.shape == (2, 4, model.code_dim)
    assert torch.allclose(same[:, 1], codes[:, :, 0, 1], atol=1e-6)
    assert torch.allclose(same[:, 2], codes[:, :, 1, 0], atol=1e-6)
    # A 1x1 map resized to 3x3 is its code everywhere.
    one = torch.tensor([[[7]], [[40]]])
    up = model.next_input(one, 3)
    assert up.shape == (2, 9, model.code_dim)
    assert torch.allclose(up, unit[[7, 40]][:, None].expand(2, 9, -1), atol=1e-5)
    # Upsizing is bicubic (align_corners=False), not nearest or bilinear.
    expected = F.interpolate(codes, size=(5, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(model.next_input(ids, 5), expected, atol=1e-6)
    assert not torch.allclose(expected, F.interpolate(codes, size=(5, 5), mode="bilinear").flatten(2).transpose(1, 2))
    assert torch.allclose(model.decode_indices(ids), model.decode(codes))
    assert model.decode(codes[..., :1]).shape == (2, 3, 8, 4)


@torch.no_grad()
def test_teacher_forcing_inputs():
    model = mnist()
    scales = [1, 2, 3, 5, 8]
    x = images(model, batch=3)
    indices = model.encode_indices(x, scales)
    inputs = model.teacher_forcing_inputs(indices, scales)
    assert inputs.shape == (3, 4 + 9 + 25 + 64, model.code_dim)
    assert torch.equal(inputs[:, 4:13], model.next_input(indices[1], 3))
    assert torch.equal(inputs[:, -64:], model.next_input(indices[3], 8))
    assert model.teacher_forcing_inputs(indices[:1], [1]).shape == (3, 0, model.code_dim)
    with pytest.raises(ValueError, match="indices"):
        model.teacher_forcing_inputs(indices[:-1], scales)
    with pytest.raises(ValueError, match=r"indices\[1\]"):
        model.teacher_forcing_inputs([indices[0], indices[2], *indices[2:]], scales)
    with pytest.raises(ValueError, match="batch"):
        model.teacher_forcing_inputs([indices[0][:1], *indices[1:]], scales)
    with pytest.raises(ValueError, match="scales"):
        model.teacher_forcing_inputs(indices[::-1], scales[::-1])


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_are_named():
    model = mnist()
    f = features(model, batch=1)
    for scales in ([1, 3, 2], [0, 1], [1, 9], [], [1, 2.0], (s for s in [1, 2]), [True, 2], [2, 2]):
        with pytest.raises(ValueError, match="scales"):
            model.indices_from_features(f, scales)
    with pytest.raises(ValueError, match="scales"):
        model.encode_indices(images(model), [1, 4, 16])
    for side in (0, 9, 2.0):
        with pytest.raises(ValueError, match="side"):
            model.quantize_features(f, side)
    with pytest.raises(ValueError, match="features"):
        model.quantize_features(f[:, :8], 2)
    with pytest.raises(ValueError, match="features"):
        model.indices_from_features(f[..., :7], [1, 2])
    for ids in (torch.tensor([[[64]]]), torch.tensor([[[-1]]]), torch.zeros(1, 1, 1), torch.zeros(1, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="ids"):
            model.embed(ids)
        with pytest.raises(ValueError, match="ids"):
            model.next_input(ids, 2)
    with pytest.raises(ValueError, match="next_side"):
        model.next_input(torch.zeros(1, 1, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="images"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="images"):
        model.encode_features(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.zeros(1, 8, 2, 2))


# ------------------------------------------------------------------------------------------------ tool
def test_parity_tool_needs_a_checkout_and_counts_differing_ids(tmp_path):
    with pytest.raises(FileNotFoundError, match="--reference"):
        parity.import_reference(tmp_path)
    row = parity.id_row("ids", torch.tensor([[[0, 1], [2, 3]]]), torch.tensor([[0, 1, 2, 4]]))
    assert row.max_abs == 1 and not row.ok(1.0)
    assert parity.UNSEEN_SCALES != parity.RELEASED_SCALES[: len(parity.UNSEEN_SCALES)]
    assert parity.reference_config(small=True).image_size // parity.reference_config(small=True).downsample == 16
