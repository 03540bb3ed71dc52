"""train.demo end to end at a few steps: the outputs it promises, and a VAE lever's run reusing that VAE."""

import json
import shutil

import pytest
from diffusers import AutoencoderKL

from train import demo, train_vae
from train.latents import CACHE_INDEX

# A smaller generator that samples with 2 steps and draws no grids while it trains: the test is of the demo's
# wiring, and these cut most of its time.
QUICK = ["--set", "sample_every=1000", "--set", 'model.sampling={"steps": 2}', "--set", "model.head_depth=1",
         "--set", "model.width=32"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo.main(["--out", str(out), "--vae-steps", "2", "--steps", "2", "--per-class", "0",
                      "--precision", "fp32", *QUICK]) == 0
    return out


def test_a_run_leaves_its_release_grid_and_results(first_run):
    results = json.loads((first_run / "results.json").read_text())
    assert results["model"] == "flowar" and results["precision"] == "fp32" and results["steps"] == 2
    assert results["autoencoder_steps"] == 2 and results["autoencoder_overrides"] == []
    assert (first_run / "grid.png").is_file() and (first_run / "flowar-release" / "model.safetensors").is_file()
    summary = json.loads((first_run / "vae" / "demo_autoencoder.json").read_text())
    assert summary["steps"] == 2 and summary["latent_norm"] == "global" and summary["seed"] == 0
    assert summary["kl_weight"] == train_vae.KL_WEIGHT  # one default of the KL weight, the demo's own


def test_a_reused_vae_without_a_lever_in_its_summary_names_it_unknown(first_run, tmp_path):
    """A VAE folder whose summary does not say its kl_weight (the demo did not train it) is not taken for the
    demo's VAE: its runs get a row of their own."""
    old = tmp_path / "old-vae"
    shutil.copytree(first_run / "vae", old)
    summary = json.loads((old / "demo_autoencoder.json").read_text())
    del summary["kl_weight"]
    (old / "demo_autoencoder.json").write_text(json.dumps(summary))
    out = tmp_path / "run"
    assert demo.main(["--out", str(out), "--autoencoder", str(old), "--steps", "1", "--per-class", "0",
                      "--precision", "fp32", *QUICK]) == 0
    assert json.loads((out / "results.json").read_text())["autoencoder_overrides"] == ["kl_weight=None"]


def test_latent_norm_on_a_reused_vae_renormalizes_a_copy_and_names_the_row(first_run, tmp_path):
    before = (first_run / "vae" / "config.json").read_text()
    out = tmp_path / "pc"
    assert demo.main(["--out", str(out), "--autoencoder", str(first_run / "vae"), "--latent-norm", "per-channel",
                      "--steps", "2", "--per-class", "0", "--precision", "fp32", *QUICK]) == 0
    assert (first_run / "vae" / "config.json").read_text() == before  # the reused VAE is untouched
    config = AutoencoderKL.load_config(out / "vae")
    assert config["scaling_factor"] == 1.0 and len(config["latents_std"]) == 4
    results = json.loads((out / "results.json").read_text())
    assert results["autoencoder_overrides"] == ["latent_norm=per-channel"] and results["autoencoder_steps"] == 2
    summary = json.loads((out / "vae" / "demo_autoencoder.json").read_text())
    assert summary["latent_norm"] == "per-channel" and summary["steps"] == 2
    index = json.loads((out / "latents" / CACHE_INDEX).read_text())
    assert index["vae"] == str(out / "vae") and index["latents_mean"] == config["latents_mean"]  # cached with the copy
