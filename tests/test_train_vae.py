"""train.train_vae: a few steps of the demo's VAE in float32 and under bf16 autocast, saved and reloaded."""

import pytest
import torch
from diffusers import AutoencoderKL

from train.demo import training_precision
from train.train_vae import VAE_CHANNELS, check_channels, renormalize_vae, small_autoencoder, train_vae


def weights(folder) -> dict:
    return AutoencoderKL.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    results = {name: train_vae(root / name, steps=3, batch_size=8, seed=0, bf16=bf16, progress=False)
               for name, bf16 in [("fp32", False), ("fp32-again", False), ("bf16", True)]}
    results["per-channel"] = train_vae(root / "per-channel", steps=3, batch_size=8, seed=0, latent_norm="per-channel",
                                       progress=False)
    return root, results


def scaling(folder) -> dict:
    config = AutoencoderKL.load_config(folder)
    return {key: config.get(key) for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}


def test_bf16_autocast_trains_float32_weights_that_differ_from_float32_training(runs):
    root, results = runs
    fp32, again, bf16 = (weights(root / name) for name in ("fp32", "fp32-again", "bf16"))
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the saved VAE is float32 like any other
    assert all(torch.equal(fp32[k], again[k]) for k in fp32)  # same seed, same process: the same weights
    moved = [k for k in fp32 if not torch.equal(fp32[k], bf16[k])]
    assert len(moved) > len(fp32) // 2  # autocast reached the networks' arithmetic
    for result in results.values():
        assert 0 < result["psnr"] < 60 and result["scaling_factor"] > 0


def test_renormalizing_a_trained_vae_is_training_it_with_that_latent_norm(runs, tmp_path):
    root, results = runs
    renormalized = renormalize_vae(root / "fp32", tmp_path / "pc", latent_norm="per-channel", seed=0)
    per_channel = scaling(root / "per-channel")
    assert per_channel["scaling_factor"] == 1.0 and len(per_channel["latents_std"]) == 4
    assert per_channel["latents_std"] != [1.0] * 4  # estimated, not left at the identity
    assert scaling(tmp_path / "pc") == per_channel  # the stats train_vae(latent_norm="per-channel") saved
    fp32, again = weights(root / "per-channel"), weights(tmp_path / "pc")
    assert all(torch.equal(fp32[k], again[k]) for k in fp32)  # the weights do not depend on the normalisation
    assert renormalized["psnr"] == pytest.approx(results["per-channel"]["psnr"], abs=1e-3)
    # and back: the global factor of the float32 run, its channel stats gone
    renormalize_vae(tmp_path / "pc", tmp_path / "global", latent_norm="global", seed=0)
    assert scaling(tmp_path / "global") == scaling(root / "fp32")
    assert scaling(root / "fp32")["latents_mean"] is None


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="latent_norm"):
        train_vae(tmp_path / "a", steps=1, latent_norm="batch")
    with pytest.raises(ValueError, match="kl_weight"):
        train_vae(tmp_path / "b", steps=1, kl_weight=-1.0)
    with pytest.raises(ValueError, match="latent_norm"):
        renormalize_vae(tmp_path / "a", tmp_path / "c", latent_norm="batch")
    for channels in [(16, 32), (16, 32, 40), (0, 32, 64), "16,32,64", (16.0, 32, 64)]:
        with pytest.raises(ValueError, match="channels must be 3 positive multiples of 16"):
            check_channels(channels)
    with pytest.raises(ValueError, match="channels"):
        train_vae(tmp_path / "d", steps=1, channels=(16, 32))
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before anything was written


def test_the_default_channels_are_the_demo_vae_of_before_the_option(tmp_path):
    # The layout every VAE trained before --channels existed has: reused folders and their results stay valid.
    assert VAE_CHANNELS == (32, 64, 64)
    assert list(small_autoencoder().config.block_out_channels) == [32, 64, 64]
    # diffusers builds 954,567 parameters for this layout: a changed block type, depth or norm shows here
    assert sum(p.numel() for p in small_autoencoder().parameters()) == 954_567


def test_other_channels_train_and_save_that_layout(tmp_path):
    result = train_vae(tmp_path / "narrow", steps=2, batch_size=4, seed=0, channels=[16, 32, 64], progress=False)
    config = AutoencoderKL.load_config(tmp_path / "narrow")
    assert list(config["block_out_channels"]) == [16, 32, 64]
    narrow = AutoencoderKL.from_pretrained(tmp_path / "narrow")
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in small_autoencoder().parameters())
    assert 0 < result["psnr"] < 60


@pytest.mark.parametrize("choice, flags, expected", [
    ("auto", ["avx2", "avx512f", "avx512_bf16"], "bf16"),
    ("auto", ["avx2", "amx_bf16", "amx_tile"], "bf16"),
    ("auto", ["avx2", "avx512f"], "fp32"),  # bf16 emulated: no faster
    ("auto", [], "fp32"),
    ("fp32", ["avx512_bf16"], "fp32"),
    ("bf16", [], "bf16"),
])
def test_the_demos_precision_follows_the_cpus_bf16_support(choice, flags, expected):
    assert training_precision(choice, flags) == expected
