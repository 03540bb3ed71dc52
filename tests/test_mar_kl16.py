"""MAR KL-16 import: converted LDM-layout models equal the diffusers model, checkpoints load safely."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

import vae.mar_kl16 as mar_kl16
from ldm_reference import LDMKLAutoencoder, randomize_
from vae import DiffusersVAE, KLArch, convert_mar_kl16, convert_mar_kl16_state_dict, load_mar_kl16, mar_kl16_config

MAR_KL16_PARAMS = 66_456_019  # counted from MAR's models/vae.py: AutoencoderKL(16, (1, 1, 2, 2, 4))

# Attention in the last encoder level as in KL-16 (side 16 of a 32 input).
TINY = KLArch(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(16,), resolution=32, z_channels=4,
              norm_num_groups=8)
# All levels of one width: a wrongly ordered decoder would load without complaint, so only the
# numbers can catch it.
EQUAL_WIDTHS = KLArch(ch=16, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                      z_channels=4, norm_num_groups=4)
# Attention in a middle encoder level and in two decoder levels.
ATTN_ELSEWHERE = KLArch(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                        decoder_attn_resolutions=(32, 16), resolution=32, z_channels=4, norm_num_groups=4)


def reference(arch: KLArch, *, seed: int = 0) -> LDMKLAutoencoder:
    model = LDMKLAutoencoder(
        ch=arch.ch, ch_mult=arch.ch_mult, num_res_blocks=arch.num_res_blocks, attn_resolutions=arch.attn_resolutions,
        decoder_attn_resolutions=arch.decoder_attn_resolutions, resolution=arch.resolution,
        z_channels=arch.z_channels, groups=arch.norm_num_groups,
    )
    return randomize_(model, seed=seed).eval()


def images(side: int, *, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(side)
    return (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(dtype)


class Opaque:
    """A Python object that a weights_only load must refuse to rebuild."""


def test_kl16_config_facts():
    config = mar_kl16_config()
    assert config["block_out_channels"] == (128, 128, 256, 256, 512)
    assert config["down_block_types"] == ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",)
    assert config["up_block_types"] == ("UpDecoderBlock2D",) * 5
    assert (config["layers_per_block"], config["latent_channels"], config["norm_num_groups"]) == (2, 16, 32)
    assert config["scaling_factor"] == 0.2325


def test_full_kl16_parameter_count_and_key_mapping():
    with torch.device("meta"):
        ours = AutoencoderKL(**mar_kl16_config())
        ldm = LDMKLAutoencoder()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ldm) == MAR_KL16_PARAMS
    # Every full-size LDM key maps onto a diffusers parameter of the same size (meta: shapes only).
    converted = convert_mar_kl16_state_dict(ldm.state_dict())
    assert converted.keys() == ours.state_dict().keys()


@pytest.mark.parametrize("arch", [TINY, EQUAL_WIDTHS, ATTN_ELSEWHERE], ids=["tiny", "equal-widths", "attn-elsewhere"])
@torch.no_grad()
def test_converted_reference_matches(arch):
    # float64 on both sides: an exact mapping agrees to rounding, a wrong one by O(1).
    ldm = reference(arch).double()
    ours = AutoencoderKL(**mar_kl16_config(arch=arch)).double().eval()
    ours.load_state_dict(convert_mar_kl16_state_dict(ldm.state_dict(), arch=arch), strict=True)
    for side in (arch.resolution, arch.resolution // 2):
        x = images(side, dtype=torch.float64)
        mean, logvar = ldm.encode(x)
        posterior = ours.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(posterior.logvar, logvar, rtol=0, atol=1e-10)
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
        torch.testing.assert_close(ours.decode(z).sample, ldm.decode(z), rtol=0, atol=1e-10)


@torch.no_grad()
def test_checkpoint_file_loads_with_weights_only(tmp_path):
    ldm = reference(TINY)
    sd = ldm.state_dict()
    # LDM training checkpoints also carry LPIPS/discriminator weights; they are dropped.
    with_loss = {**sd, "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    torch.save({"model": with_loss, "epoch": 3}, tmp_path / "kl16.ckpt")
    torch.save(sd, tmp_path / "bare.ckpt")
    torch.save({"state_dict": sd}, tmp_path / "lightning.ckpt")

    x = images(32)
    mean, _ = ldm.encode(x)
    for name in ("kl16.ckpt", "bare.ckpt", "lightning.ckpt"):
        vae = load_mar_kl16(tmp_path / name, arch=TINY, sample_posterior=False)
        assert isinstance(vae, DiffusersVAE) and vae.scaling_factor == 0.2325 and vae.shift_factor == 0.0
        z = vae.encode(x)
        torch.testing.assert_close(z, mean * 0.2325, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(z), ldm.decode(mean), rtol=1e-5, atol=1e-5)


def test_checkpoint_with_python_objects_is_refused(tmp_path):
    torch.save({"model": reference(TINY).state_dict(), "args": Opaque()}, tmp_path / "kl16.ckpt")
    with pytest.raises(ValueError, match="besides tensors"):
        load_mar_kl16(tmp_path / "kl16.ckpt", arch=TINY)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_mar_kl16(tmp_path / "kl16.ckpt", arch=TINY)


def test_unknown_key_raises_listing_it():
    sd = reference(TINY).state_dict()
    for extra in ("encoder.down.0.block.0.temb_proj.weight", "model_ema.decay", "decoder.up.5.block.0.conv1.weight"):
        with pytest.raises(ValueError, match="unknown keys.*" + extra.replace(".", r"\.")):
            convert_mar_kl16_state_dict({**sd, extra: torch.zeros(1)}, arch=TINY)


def test_missing_and_misshapen_keys_raise():
    sd = reference(TINY).state_dict()
    without = {k: v for k, v in sd.items() if k != "decoder.up.1.upsample.conv.weight"}
    with pytest.raises(ValueError, match=r"no source.*decoder\.up_blocks\.0\.upsamplers\.0\.conv\.weight"):
        convert_mar_kl16_state_dict(without, arch=TINY)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_mar_kl16_state_dict(sd, arch=KLArch(**{**TINY.__dict__, "z_channels": 8}))
    # Attention weights present where the architecture has none are unknown keys, not silently dropped.
    level0_attn = {k.replace("down.1.", "down.0."): v for k, v in sd.items() if k.startswith("encoder.down.1.attn.")}
    with pytest.raises(ValueError, match=r"unknown keys.*encoder\.down\.0\.attn"):
        convert_mar_kl16_state_dict({**sd, **level0_attn}, arch=TINY)


def test_arch_rejects_unmappable_numbers():
    with pytest.raises(ValueError, match="ch_mult"):
        KLArch(ch_mult=(2, 2, 4))
    with pytest.raises(ValueError, match="norm_num_groups"):
        KLArch(ch=24, norm_num_groups=32)


@torch.no_grad()
def test_convert_writes_a_diffusers_folder(tmp_path):
    ldm = reference(TINY)
    torch.save({"model": ldm.state_dict()}, tmp_path / "kl16.ckpt")
    out = convert_mar_kl16(tmp_path / "kl16.ckpt", tmp_path / "kl16-diffusers", arch=TINY)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == 0.2325 and config["down_block_types"][-1] == "AttnDownEncoderBlock2D"
    vae = DiffusersVAE.from_pretrained(out, sample_posterior=False)
    x = images(32)
    mean, _ = ldm.encode(x)
    torch.testing.assert_close(vae.decode(vae.encode(x)), ldm.decode(mean), rtol=1e-5, atol=1e-5)


def test_command_line_entry(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(mar_kl16, "convert_mar_kl16", lambda ckpt, out: calls.append((ckpt, out)) or tmp_path)
    mar_kl16.main(["kl16.ckpt", "out_dir"])
    assert calls == [("kl16.ckpt", "out_dir")]
    assert "from_pretrained" in capsys.readouterr().out
