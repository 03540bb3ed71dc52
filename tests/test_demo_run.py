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


def test_the_fewstep_demo_distils_a_flowar_runs_head_and_scores_the_student(first_run, tmp_path):
    """--model flowar-fewstep --teacher RUN: the run's FlowAR release is distilled into a flow-map head of 2 jumps
    per scale, sampled unguided; the run itself is left as it was."""
    from flowar import FlowARPipeline

    before = (first_run / "results.json").read_text()
    out = tmp_path / "fewstep"
    assert demo.main(["--out", str(out), "--model", "flowar-fewstep", "--teacher", str(first_run),
                      "--distill", "steps=2", "--distill", "batch=8", "--per-class", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "flowar-fewstep" and results["seed"] == 0 and results["teacher"] == str(first_run)
    assert results["distill"] == {**demo.DISTILL, "steps": 2, "batch": 8}
    assert results["distill_overrides"] == ["steps=2", "batch=8"]
    # 4 scales x 2 jumps, one head evaluation each; the teacher sampled with 2 guided Euler steps per scale.
    assert results["head_evaluations"] == 8 and results["num_samples"] == 10
    student = FlowARPipeline.from_pretrained(results["release"]).model
    assert student.config.flow_map and student.config.sampling.solver == "flow-map"
    assert student.config.sampling.guidance_scale == 1.0
    assert (out / "grid.png").is_file() and (out / "distill" / "tensorboard").is_dir()
    assert (first_run / "results.json").read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["--model", "flowar", "--teacher", "RUN"], "--teacher distils a FlowAR demo run's head: it needs --model flowar-fewstep"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--set", "lr=1"], "--teacher reuses the run's VAE and FlowAR"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--seed", "5"], "--seed 5: the teacher run"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--distill", "jumps=2"], "--distill takes KEY=VALUE with KEY among"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--distill", "steps=many"], "--distill steps takes an integer"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--distill", "jumps_per_scale=1/2"],
     "--distill jumps_per_scale takes one count or one per scale of [1, 2, 4, 8]"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--distill", "prefix=model"], "--distill: argument --prefix"),
    (["--model", "flowar-fewstep", "--teacher", "RUN", "--distill", "steps=0"], "--distill: --steps must be"),
    (["--model", "flowar", "--distill", "steps=2"], "--distill sets the distillation of --model flowar-fewstep"),
])
def test_bad_teacher_and_distill_options_are_refused_by_name(first_run, argv, message, tmp_path, capsys):
    argv = [str(first_run) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_teacher_that_is_not_a_flowar_run_is_refused(first_run, tmp_path, capsys):
    fake = tmp_path / "var-run"
    fake.mkdir()
    (fake / "results.json").write_text(json.dumps({"model": "var", "seed": 0}))
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "out"), "--model", "flowar-fewstep", "--teacher", str(fake)])
    assert "the teacher must be a --model flowar run" in capsys.readouterr().err


def test_the_fewstep_demo_without_a_teacher_trains_the_flowar_first(tmp_path):
    out = tmp_path / "fs"
    assert demo.main(["--out", str(out), "--model", "flowar-fewstep", "--vae-steps", "2", "--steps", "2",
                      "--per-class", "0", "--precision", "fp32", "--distill", "steps=1", "--distill", "batch=8",
                      "--distill", "jumps_per_scale=1/1/2/3", *QUICK]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"] == str(out / "flowar-release") and results["steps"] == 2
    assert (out / "flowar-release" / "model.safetensors").is_file()  # the teacher, as the FlowAR demo leaves it
    # Per-scale jumps: the release samples 1 + 1 + 2 + 3 head evaluations per image.
    assert results["release"] == str(out / "distill" / "release") and results["head_evaluations"] == 7


def test_the_xar_demo_trains_on_the_reused_vae_and_scores(first_run, tmp_path):
    """--model xar: the same VAE latents, cells of 4x4 tokens, the release sampled and scored with the digit
    classifier; results.json records its transformer passes (one per cell)."""
    out = tmp_path / "xar"
    assert demo.main(["--out", str(out), "--model", "xar", "--autoencoder", str(first_run / "vae"), "--steps", "2",
                      "--per-class", "1", "--precision", "fp32", "--set", "sample_every=1000",
                      "--set", 'model.sampling={"steps": 3}', "--set", "model.width=32"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "xar" and results["transformer_passes"] == 4 and results["steps"] == 2
    assert (out / "xar-release" / "model.safetensors").is_file() and (out / "grid.png").is_file()
    assert 0.0 <= results["class_consistency"] <= 1.0 and results["frechet_distance"] > 0
