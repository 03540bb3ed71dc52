"""train.train_vae: a few steps of the demo's VAE in float32 and under bf16 autocast, saved and reloaded."""

import pytest
import torch
from diffusers import AutoencoderKL

from train.demo import training_precision
from train.train_vae import train_vae


def weights(folder) -> dict:
    return AutoencoderKL.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    results = {name: train_vae(root / name, steps=3, batch_size=8, seed=0, bf16=bf16, progress=False)
               for name, bf16 in [("fp32", False), ("fp32-again", False), ("bf16", True)]}
    return root, results


def test_bf16_autocast_trains_float32_weights_that_differ_from_float32_training(runs):
    root, results = runs
    fp32, again, bf16 = (weights(root / name) for name in ("fp32", "fp32-again", "bf16"))
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the saved VAE is float32 like any other
    assert all(torch.equal(fp32[k], again[k]) for k in fp32)  # same seed, same process: the same weights
    moved = [k for k in fp32 if not torch.equal(fp32[k], bf16[k])]
    assert len(moved) > len(fp32) // 2  # autocast reached the networks' arithmetic
    for result in results.values():
        assert 0 < result["psnr"] < 60 and result["scaling_factor"] > 0


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="latent_norm"):
        train_vae(tmp_path / "a", steps=1, latent_norm="batch")
    with pytest.raises(ValueError, match="kl_weight"):
        train_vae(tmp_path / "b", steps=1, kl_weight=-1.0)


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
