"""VAR's multi-scale residual VQ tokenizer (vae.msvq) and its trainer (train.train_tokenizer)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vae.msvq as msvq
from tools import parity_var_tokenizer as parity
from train import train_tokenizer as tt
from train.data import MNISTDataset
from vae.msvq import MultiScaleVQConfig, MultiScaleVQVAE, get_msvq_preset

RELEASE_PARAMS = 108_948_355  # counted on the authors' VQVAE(ch=160, V=4096, Cvae=32) by tools/parity_var_tokenizer.py


def tiny(seed: int = 0, **overrides) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(get_msvq_preset("tiny", **overrides)).eval()
    with torch.no_grad():  # codes of the features' scale, so that many different codes get picked
        f = model.encode_features(images(model, batch=8, seed=seed + 100))
        model.quantize.embedding.weight.normal_(0, float(f.std()))
    return model


def images(model: MultiScaleVQVAE, *, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = model.image_size
    return torch.rand(batch, model.config.image_channels, side, side, generator=g) * 2 - 1


def var_encode(model: MultiScaleVQVAE, f: torch.Tensor):
    """VAR's encoding written out independently: area-pool the rest (last scale as is), nearest code by cdist,
    embed, bicubic up to S (last as is), phi, f_hat += h, rest -= h."""
    q, scales = model.quantize, model.scales
    rest, f_hat, out = f.clone(), torch.zeros_like(f), []
    for k, s in enumerate(scales):
        z = rest if k == len(scales) - 1 else F.interpolate(rest, size=(s, s), mode="area")
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat.double(), q.embedding.weight.double()).argmin(1).view(f.shape[0], s, s)
        h = q.embedding.weight[idx].permute(0, 3, 1, 2)
        if k != len(scales) - 1:
            h = F.interpolate(h, size=(scales[-1],) * 2, mode="bicubic")
        h = q.phi(k)(h)
        f_hat, rest = f_hat + h, rest - h
        out.append(idx)
    return out, f_hat


# ------------------------------------------------------------------------------------------- token paths
@torch.no_grad()
def test_encode_follows_var_and_indices_round_trip_to_the_same_f_hat():
    model = tiny()
    x = images(model)
    indices, f_hat = model.encode_to_indices_and_f_hat(x)
    assert [tuple(i.shape) for i in indices] == [(4, s, s) for s in model.scales]
    assert all(i.dtype == torch.long for i in indices)
    expected, expected_f_hat = var_encode(model, model.encode_features(x))
    for k, (a, b) in enumerate(zip(indices, expected)):
        assert torch.equal(a, b), f"scale {model.scales[k]}"
    torch.testing.assert_close(f_hat, expected_f_hat, rtol=0, atol=1e-5)
    assert len({int(c) for i in indices for c in i.unique()}) > 10  # the check is not about one code
    torch.testing.assert_close(model.indices_to_f_hat(model.encode_indices(x)), f_hat, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode(x), f_hat, rtol=0, atol=0)
    # Decoding goes through f_hat and clamps to the image range.
    decoded = model.decode_indices(indices)
    torch.testing.assert_close(decoded, model.decode_f_hat(f_hat))
    assert decoded.shape == x.shape and decoded.abs().max() <= 1


@torch.no_grad()
def test_teacher_forcing_inputs_equal_the_step_by_step_accumulate_path():
    model = tiny()
    indices = model.encode_indices(images(model, batch=3))
    f_hat, inputs = None, []
    for k, idx in enumerate(indices):
        before = None if f_hat is None else f_hat.clone()
        new, nxt = model.accumulate(k, f_hat, idx)
        if before is not None:
            assert torch.equal(f_hat, before)  # accumulate returns a new tensor
        if k < len(indices) - 1:
            side = model.scales[k + 1]
            assert nxt.shape == (3, side * side, model.code_dim)
            # Independently: area-pool the running sum and flatten row-major.
            pooled = F.interpolate(new, size=(side, side), mode="area")
            torch.testing.assert_close(nxt, pooled.permute(0, 2, 3, 1).reshape(3, side * side, -1))
            inputs.append(nxt)
        else:
            assert nxt is None
        f_hat = new
    teacher = model.teacher_forcing_inputs(indices)
    assert teacher.shape == (3, sum(s * s for s in model.scales[1:]), model.code_dim)
    torch.testing.assert_close(teacher, torch.cat(inputs, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.teacher_forcing_inputs(indices[:-1]), teacher, rtol=0, atol=0)
    torch.testing.assert_close(f_hat, model.indices_to_f_hat(indices), rtol=0, atol=1e-6)
    assert model.embed_codes(indices[1]).shape == (3, model.code_dim, 2, 2)
    torch.testing.assert_close(model.embed_codes(indices[1])[0, :, 1, 0],
                               model.quantize.embedding.weight[indices[1][0, 1, 0]])


# ------------------------------------------------------------------------------------------- phi
# linspace(1/12, 11/12, 4) = 1/12, 13/36, 23/36, 11/12, as numpy rounds them: with ten scales, k/9 for k = 2 and 7
# lies exactly halfway between two ticks in real numbers, so the float ticks decide (as in the authors' code).
TWELFTHS = np.linspace(1 / 12, 11 / 12, 4)


def nearest_of_ticks(position: float, ticks) -> int:
    return int(np.argmin(np.abs(np.asarray(ticks) - position)))


def test_partial_phi_picks_the_nearest_of_linspace_twelfths():
    ticks = TWELFTHS
    for num_scales in (2, 4, 7, 10):
        config = MultiScaleVQConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8,
                                    scales=tuple(range(1, num_scales + 1)), phi_sharing="partial", phi_count=4)
        expected = [nearest_of_ticks(k / (num_scales - 1), ticks) for k in range(num_scales)]
        assert [config.phi_index(k) for k in range(num_scales)] == expected
    # The release (checked against the authors' PhiPartiallyShared by tools/parity_var_tokenizer.py).
    assert [MultiScaleVQConfig().phi_index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # Three partial convs use the other rule, linspace(1/6, 5/6, 3).
    three = MultiScaleVQConfig(phi_count=3)
    assert [three.phi_index(k) for k in range(10)] == [nearest_of_ticks(k / 9, [1 / 6, 1 / 2, 5 / 6]) for k in range(10)]


@pytest.mark.parametrize("sharing", ["partial", "shared", "none"])
@torch.no_grad()
def test_phi_modes_use_the_right_conv_per_scale(sharing):
    model = tiny(phi_sharing=sharing, scales=(1, 2, 3, 4, 5, 6, 7, 8), ch_mult=(1, 2, 2, 2))
    quantize, num_scales = model.quantize, len(model.scales)
    if sharing == "shared":
        convs, expected = [quantize.quant_resi.qresi], [0] * num_scales
    elif sharing == "partial":
        convs = list(quantize.quant_resi.qresi_ls)
        expected = [nearest_of_ticks(k / 7, TWELFTHS) for k in range(num_scales)]
    else:
        convs, expected = list(quantize.quant_resi), list(range(num_scales))  # one per scale, in order
    assert len(convs) == model.config.num_phi == {"shared": 1, "partial": 4, "none": 8}[sharing]
    for k in range(num_scales):
        assert quantize.phi(k) is convs[expected[k]], f"scale {k}"
    # The contribution really goes through that conv: (1 - r) h + r conv(h) after the bicubic upsampling.
    idx = torch.randint(model.codebook_size, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    h = F.interpolate(model.quantize.embedding.weight[idx].permute(0, 3, 1, 2), size=(8, 8), mode="bicubic")
    conv = convs[expected[2]]
    expected_h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(quantize.contribution(2, idx), expected_h)


def test_phi_ratio_zero_is_the_identity_without_weights():
    model = tiny(phi_ratio=0.0)
    assert not [k for k in model.state_dict() if "quant_resi" in k]
    idx = torch.zeros(1, 4, 4, dtype=torch.long)
    torch.testing.assert_close(model.quantize.contribution(3, idx), model.quantize.embed(idx))


# ------------------------------------------------------------------------------------------- released layout
def authors_layout(ch=160, ch_mult=(1, 1, 2, 2, 4), blocks=2, z=32, vocab=4096, num_scales=10, phi=4):
    """Names and shapes of the authors' VQVAE state dict, written from reading models/{vqvae,basic_vae,quant}.py:
    LDM-style encoder/decoder with a single ``qkv`` 1x1 conv in attention, attention after every resnet of the
    lowest-resolution level and in the middle, decoder levels with blocks + 1 resnets stored by level index,
    3x3 quant convs, ``quantize.embedding``, ``quantize.ema_vocab_hit_SV`` and ``quant_resi.qresi_ls.{i}``."""
    out = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c), conv(f"{name}.qkv", c, 3 * c, 1), conv(f"{name}.proj_out", c, c, 1)

    def middle(name, c):
        resnet(f"{name}.block_1", c, c), attn(f"{name}.attn_1", c), resnet(f"{name}.block_2", c, c)

    last = len(ch_mult) - 1
    conv("encoder.conv_in", 3, ch, 3)
    width = ch
    for level, m in enumerate(ch_mult):
        for b in range(blocks):
            resnet(f"encoder.down.{level}.block.{b}", width, ch * m)
            width = ch * m
            if level == last:
                attn(f"encoder.down.{level}.attn.{b}", width)
        if level != last:
            conv(f"encoder.down.{level}.downsample.conv", width, width, 3)
    middle("encoder.mid", width)
    norm("encoder.norm_out", width), conv("encoder.conv_out", width, z, 3)
    conv("decoder.conv_in", z, width, 3)
    middle("decoder.mid", width)
    for level in reversed(range(len(ch_mult))):
        for b in range(blocks + 1):
            resnet(f"decoder.up.{level}.block.{b}", width, ch * ch_mult[level])
            width = ch * ch_mult[level]
            if level == last:
                attn(f"decoder.up.{level}.attn.{b}", width)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", width), conv("decoder.conv_out", width, 3, 3)
    conv("quant_conv", z, z, 3), conv("post_quant_conv", z, z, 3)
    out["quantize.embedding.weight"] = (vocab, z)
    out["quantize.ema_vocab_hit_SV"] = (num_scales, vocab)
    for i in range(phi):
        conv(f"quantize.quant_resi.qresi_ls.{i}", z, z, 3)
    return out


def test_the_release_layout_loads_with_no_missing_or_unexpected_keys():
    with torch.device("meta"):
        model = MultiScaleVQVAE(get_msvq_preset("vae_ch160v4096z32"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = authors_layout()
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == RELEASE_PARAMS
    assert (model.downsample, model.code_dim, model.codebook_size, model.image_size) == (16, 32, 4096, 256)
    # A state dict with their names goes through the released-file path (meta tensors: shapes only).
    state = {k: torch.empty(shape, device="meta") for k, shape in theirs.items()}
    msvq.load_state_strict(model, msvq.convert_released_state_dict(state, model.config), source="test")
    # VAR's 512 px models use the same file with other scales: only the hit statistics differ, and are reset.
    with torch.device("meta"):
        big = MultiScaleVQVAE(get_msvq_preset("vae_ch160v4096z32", scales=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)))
    msvq.load_state_strict(big, msvq.convert_released_state_dict(state, big.config), source="test")
    del state["quantize.quant_resi.qresi_ls.3.bias"]
    state["quantize.extra"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"1 missing: quantize.quant_resi.qresi_ls.3.bias; 1 unexpected: quantize.extra"):
        msvq.load_state_strict(model, state, source="test")


def test_from_released_reads_an_authors_style_file_and_convert_writes_our_folder(tmp_path):
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["quantize.ema_vocab_hit_SV"] = torch.rand(7, model.codebook_size)  # trained with other scales
    torch.save(state, tmp_path / "vae.pth")
    loaded = MultiScaleVQVAE.from_released(tmp_path / "vae.pth", model.config)
    torch.testing.assert_close(loaded.quantize.embedding.weight, model.quantize.embedding.weight)
    assert torch.equal(loaded.quantize.ema_vocab_hit_SV, torch.zeros(len(model.scales), model.codebook_size))
    torch.save({"model": model.state_dict()}, tmp_path / "wrapped.pth")
    MultiScaleVQVAE.from_released(tmp_path / "wrapped.pth", model.config)
    with pytest.raises(ValueError, match="shape mismatch"):  # a file of another architecture
        MultiScaleVQVAE.from_released(tmp_path / "vae.pth", get_msvq_preset("tiny", code_dim=4))
    with pytest.raises(FileNotFoundError, match="path"):
        MultiScaleVQVAE.from_released(tmp_path / "missing.pth")
    torch.save({"a": object()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="path"):
        MultiScaleVQVAE.from_released(tmp_path / "pickled.pth", model.config)
    assert msvq.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2


# ------------------------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trip(tmp_path):
    model = tiny(phi_sharing="none", codebook_size=16)
    model.quantize.ema_vocab_hit_SV.fill_(3.0)
    folder = model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "multiscale_vq" and config["phi_sharing"] == "none" and config["codebook_size"] == 16
    loaded = MultiScaleVQVAE.from_pretrained(folder)
    assert loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images(model, batch=2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode_indices(x), model.encode_indices(x)))
    config["model_type"] = "flowar"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="flowar"):
        MultiScaleVQVAE.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="folder"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- training
def test_training_forward_losses_route_gradients_like_var():
    model = tiny().train()
    x = images(model, batch=2)
    out = model(x)
    assert out.code_counts.shape == (len(model.scales), model.codebook_size)
    assert out.code_counts.sum(1).tolist() == [2 * s * s for s in model.scales]
    assert [r.shape for r in out.residuals] == [(2 * s * s, model.code_dim) for s in model.scales]
    torch.testing.assert_close(out.loss, out.recon_loss + 0.25 * out.commitment_loss + out.codebook_loss)
    torch.testing.assert_close(out.recon_loss, F.mse_loss(out.reconstruction, x))
    # The straight-through f_hat carries the quantised values.
    torch.testing.assert_close(out.f_hat.detach(), model.encode(x), rtol=0, atol=1e-5)
    codes, first_conv = model.quantize.embedding.weight, model.encoder.conv_in.weight

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return [None if p.grad is None else float(p.grad.abs().sum()) for p in (codes, first_conv)]

    assert grads(out.commitment_loss)[0] is None and grads(out.commitment_loss)[1] > 0  # to the encoder only
    assert grads(out.codebook_loss)[0] > 0 and grads(out.codebook_loss)[1] is None  # to the codes only
    assert grads(out.recon_loss)[0] is None and grads(out.recon_loss)[1] > 0  # straight through to the encoder
    assert model.quantize.ema_vocab_hit_SV.sum() > 0  # training updates the hit statistics
    with pytest.raises(ValueError, match="recon"):
        model(x, recon="lpips")


def test_dead_code_reset_replaces_unused_codes_and_leaves_used_ones():
    model = tiny(codebook_size=8)
    tracker = tt.DeadCodeTracker(4, 8, dead_after=3)
    used = torch.zeros(4, 8, dtype=torch.long)
    used[0, 1] = used[3, 5] = used[2, 6] = 2  # codes 1, 5, 6 hit every step
    late = used.clone()
    late[1, 2] = 1  # code 2 only hit at the second step
    for counts in (used, late, used):
        tracker.update(counts)
    plan = tracker.plan(torch.Generator().manual_seed(0))
    assert sorted(torch.cat([codes for _, codes in plan]).tolist()) == [0, 3, 4, 7]  # idle 3 steps; code 2 only 1
    before = model.quantize.embedding.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(images(model, batch=2)).loss.backward()
    optimizer.step()
    after_step = model.quantize.embedding.weight.detach().clone()
    residuals = [torch.full((n, model.code_dim), float(k + 10)) for k, n in enumerate((2, 8, 18, 32))]
    moved = tt.revive_codes(model, tracker, residuals, generator=torch.Generator().manual_seed(0), optimizer=optimizer)
    assert sum(moved) == 4 and tracker.plan(torch.Generator()) == []  # revived codes get their grace period
    weight = model.quantize.embedding.weight.detach()
    for code in range(8):
        if code in (0, 3, 4, 7):
            assert weight[code, 0].item() in (10.0, 11.0, 12.0, 13.0) and torch.all(weight[code] == weight[code, 0])
        else:
            assert torch.equal(weight[code], after_step[code])
    assert not torch.equal(before[[0, 3, 4, 7]], weight[[0, 3, 4, 7]])
    moments = optimizer.state[model.quantize.embedding.weight]
    assert moments["exp_avg"][[0, 3, 4, 7]].abs().sum() == 0 and moments["exp_avg_sq"][[0, 3, 4, 7]].abs().sum() == 0
    assert moments["exp_avg_sq"].abs().sum() > 0
    # A dead code's scale is drawn uniformly (not in proportion to the vectors): scale 1 gets about a quarter.
    dead_everywhere = tt.DeadCodeTracker(4, 8, dead_after=1)
    dead_everywhere.update(torch.zeros(4, 8, dtype=torch.long))
    generator = torch.Generator().manual_seed(1)
    to_scale_1 = sum(int(codes.numel()) for _ in range(25) for k, codes in dead_everywhere.plan(generator) if k == 0)
    assert 30 <= to_scale_1 <= 75
    with pytest.raises(ValueError, match="dead_after"):
        tt.DeadCodeTracker(4, 8, dead_after=0)
    with pytest.raises(ValueError, match="min_scale_use"):
        tt.DeadCodeTracker(4, 8, dead_after=2, min_scale_use=2.0)


def test_per_scale_floor_moves_the_least_used_codes_to_a_collapsed_scale():
    tracker = tt.DeadCodeTracker(2, 8, dead_after=2, min_scale_use=0.5)
    counts = torch.zeros(2, 8, dtype=torch.long)
    counts[1] = torch.tensor([5, 1, 9, 2, 8, 7, 6, 4])  # the fine scale uses every code, 1 and 3 the least
    counts[0, 2] = 40  # the coarse scale has collapsed onto code 2
    for _ in range(2):
        tracker.update(counts)
    plan = tracker.plan(torch.Generator().manual_seed(0))
    assert [(k, codes.tolist()) for k, codes in plan] == [(0, [1, 3, 7])]  # 4 of 8 must be live; 1 is
    model = tiny(codebook_size=8)
    residuals = [torch.full((2, model.code_dim), 5.0), torch.zeros(64, model.code_dim)]  # fewer rows than codes
    assert tt.revive_codes(model, tracker, residuals, generator=torch.Generator().manual_seed(0)) == [3, 0]
    assert torch.all(model.quantize.embedding.weight[[1, 3, 7]] == 5.0)
    assert tracker.plan(torch.Generator()) == []
    # A scale that sees few tokens is asked for fewer codes: 2 steps x 6 tokens / 4 = 3 codes, half of them = 2.
    few = tt.DeadCodeTracker(2, 8, dead_after=2, min_scale_use=0.5)
    counts[0, 2] = 6
    for _ in range(2):
        few.update(counts)
    assert [(k, codes.numel()) for k, codes in few.plan(torch.Generator())] == [(0, 1)]
    # Without the floor nothing moves: no code is dead.
    plain = tt.DeadCodeTracker(2, 8, dead_after=2)
    for _ in range(2):
        plain.update(counts)
    assert plain.plan(torch.Generator()) == []


def test_a_few_training_steps_lower_the_loss():
    model = tiny(seed=1).train()
    digits = MNISTDataset(image_size=model.image_size, split="heldout")
    x = torch.stack([digits[i][0] for i in range(0, 500, 31)])  # 17 digits of every class
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_train_tokenizer_on_mnist_saves_a_loadable_tokenizer(tmp_path):
    result = tt.train_tokenizer(tmp_path / "run", preset="tiny", steps=6, batch_size=8, eval_images=20, warmup=2,
                                dead_after=2, gan_weight=0.1, gan_start=3, eval_every=3, progress=False)
    assert len(result["usage"]) == 4 and all(0 < u <= 1 for u in result["usage"])
    assert result["codes_reset"] > 0 and result["history"][0]["step"] == 3
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["usage"] == result["usage"] and metrics["psnr"] == result["psnr"]
    model = MultiScaleVQVAE.from_pretrained(tmp_path / "run")
    assert model.config == get_msvq_preset("tiny")
    # The reported PSNR is the saved tokenizer's on the first 20 held-out digits, computed here by hand:
    # reconstruct through the token path, clamp to [-1, 1], 10 log10(peak-to-peak^2 / MSE) per image, mean.
    digits = MNISTDataset(image_size=model.image_size, split="heldout")
    heldout = torch.stack([digits[i][0] for i in range(20)])
    with torch.no_grad():
        reconstruction = model.decode_indices(model.encode_indices(heldout)).clamp(-1, 1).double()
    mse = (reconstruction - heldout.double()).pow(2).mean(dim=(1, 2, 3))
    assert result["psnr"] == pytest.approx(float((10 * torch.log10(4.0 / mse)).mean()), abs=1e-3)
    # Usage is the share of the V codes picked at least once at each scale.
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    evaluation = tt.evaluate(model, x)
    expected = [len(i.unique()) / model.codebook_size for i in model.encode_indices(x)]
    assert evaluation["usage"] == pytest.approx(expected)


def test_psnr_of_a_known_perturbation():
    target = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5  # in [-0.5, 0.5]
    # A constant offset c has MSE c^2: PSNR = 10 log10(2^2 / c^2) = 20 log10(2 / c); 0.1 -> 26.0206 dB.
    for offset, db in ((0.1, 26.0206), (0.5, 12.0412), (0.02, 40.0)):
        torch.testing.assert_close(tt.psnr_per_image(target + offset, target), torch.full((3,), db),
                                   rtol=0, atol=1e-3)
    # Reconstructions are clamped to [-1, 1] first: 0.9 reconstructed as 1.3 is an error of 0.1, not 0.4.
    torch.testing.assert_close(tt.psnr_per_image(torch.full((1, 3, 4, 4), 1.3), torch.full((1, 3, 4, 4), 0.9)),
                               torch.tensor([26.0206]), rtol=0, atol=1e-3)
    # One image off by 0.1 and another by 0.5: each gets its own PSNR.
    two = target[:2].clone()
    two[0] += 0.1
    two[1] -= 0.5
    torch.testing.assert_close(tt.psnr_per_image(two, target[:2]), torch.tensor([26.0206, 12.0412]), rtol=0, atol=1e-3)


def test_patch_discriminator_and_hinge_losses():
    disc = tt.PatchDiscriminator(3, width=8, num_layers=2)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert tt.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert tt.hinge_g_loss(fake).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, match", [
    (dict(phi_sharing="half"), "phi_sharing"),
    (dict(scales=(1, 3, 2)), "scales"),
    (dict(scales=(4,)), "scales"),
    (dict(norm_num_groups=7), "norm_num_groups"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(phi_ratio=1.5), "phi_ratio"),
    (dict(quant_conv_kernel=2), "quant_conv_kernel"),
])
def test_bad_config_values_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_msvq_preset("tiny", **overrides)


def test_bad_arguments_are_named():
    model = tiny()
    indices = model.encode_indices(images(model, batch=2))
    with pytest.raises(ValueError, match="name must be one of"):
        get_msvq_preset("vae_ch999")
    with pytest.raises(ValueError, match="images"):
        model.encode_indices(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="indices must be a list of 4"):
        model.indices_to_f_hat(indices[:2])
    with pytest.raises(ValueError, match=r"indices\[1\]"):
        model.indices_to_f_hat([indices[0], indices[2], indices[2], indices[3]])
    with pytest.raises(ValueError, match=r"indices\[0\] must be a LongTensor"):
        model.teacher_forcing_inputs([indices[0].int()] + indices[1:])
    with pytest.raises(ValueError, match="k must be"):
        model.accumulate(4, None, indices[3])
    with pytest.raises(ValueError, match="indices_k"):
        model.accumulate(1, None, indices[2])
    with pytest.raises(ValueError, match="f_hat"):
        model.accumulate(1, torch.zeros(3, model.code_dim, 4, 4), indices[1])
    with pytest.raises(ValueError, match="f_hat"):
        model.decode_f_hat(torch.zeros(1, model.code_dim, 3, 3))
    with pytest.raises(ValueError, match="config"):
        MultiScaleVQVAE({"ch": 16})
    with pytest.raises(ValueError, match="recon"):
        tt.train_tokenizer("unused", preset="tiny", recon="l3")
    with pytest.raises(ValueError, match="image_size"):
        tt.train_tokenizer("unused", preset="tiny", image_size=32)
    with pytest.raises(ValueError, match="model.colour"):
        tt.load_tokenizer_config(None, ["model.colour=red"])
    assert (tt.load_tokenizer_config(None, ["model.scales=[1,2,4,8]", "model.phi_sharing=shared"]).model
            == {"scales": [1, 2, 4, 8], "phi_sharing": "shared"})


# ------------------------------------------------------------------------------------------- parity tool
def test_parity_tool_restores_a_patched_nn_init_and_needs_a_checkout(tmp_path):
    original = torch.nn.Conv2d.reset_parameters
    with parity.guard_nn_init() as changed:
        torch.nn.Conv2d.reset_parameters = lambda self: None  # what the authors' builder does
        torch.nn.SyncBatchNorm.reset_parameters = lambda self: None  # an inherited one
    assert torch.nn.Conv2d.reset_parameters is original
    assert "reset_parameters" not in torch.nn.SyncBatchNorm.__dict__
    assert sorted(changed) == ["Conv2d", "SyncBatchNorm"]
    with pytest.raises(FileNotFoundError, match="--reference"):
        parity.import_reference(tmp_path)
    rows = parity.compare_indices([torch.zeros(1, 2, 2, dtype=torch.long)], [torch.tensor([[0, 0, 1, 0]])], (2,))
    assert rows[0].max_abs == 1 and not rows[0].ok(1.0)
