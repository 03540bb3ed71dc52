"""eval/sample.py: counts and labels, the ADM npz, 1 vs 2 gloo processes, kill and resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from eval.sample import SimulatedKill, load_pipeline, main, run, sample_seeds
from flowar import VAR, FlowAR, FlowARPipeline, VARPipeline, get_preset, get_var_preset
from vae import DiffusersVAE
from vae.msvq import MultiScaleVQVAE, get_msvq_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ROOT = Path(__file__).resolve().parents[1]
# 4 classes x 2 = 8 samples; batch 3 makes chunks [0, 3), [3, 6), [6, 8).
SMALL = dict(num_classes=4, per_class=2, steps=2, progress=False)


def tiny_pipeline(**overrides) -> FlowARPipeline:
    """Random flowar-tiny (8x8x4 latents) + a tiny AutoencoderKL: 16x16 images, as test_pipeline_cli builds."""
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=16, scaling_factor=0.5,
    )
    model = FlowAR(get_preset("flowar-tiny", **overrides)).eval()
    return FlowARPipeline(model, DiffusersVAE(autoencoder).eval())


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    tiny_pipeline().save_pretrained(path)
    return path


def load_npz(out):
    with np.load(Path(out) / "samples.npz") as f:
        return {key: f[key] for key in f.files}


def png_names(out):
    return sorted(os.listdir(Path(out) / "images"))


def torchrun(pipe_dir, out, *args, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "eval.sample", str(pipe_dir), "--out", str(out), "--num-classes", "4", "--per-class", "2",
           "--steps", "2", "--batch-size", "3", "--no-progress", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_counts_labels_and_the_adm_npz(tmp_path, pipe_dir):
    out = run(pipe_dir, tmp_path / "run", batch_size=3, format="both", **SMALL)
    assert png_names(out) == [f"{i:06d}.png" for i in range(8)]
    expected_labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(np.load(out / "labels.npy"), expected_labels)
    npz = load_npz(out)
    assert set(npz) == {"arr_0", "labels"}
    assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].dtype == np.int64
    np.testing.assert_array_equal(npz["labels"], expected_labels)
    for i in range(8):  # the npz is the PNGs, in global index order
        np.testing.assert_array_equal(npz["arr_0"][i], np.asarray(Image.open(out / "images" / f"{i:06d}.png")))
    # sample i is the pipeline's image for label i // 2 and the noise of seed (0, i) ...
    pipe = load_pipeline(pipe_dir)
    for i in (0, 5):
        alone = pipe([i // 2], output_type="np", steps=2, noise=pipe.model.noise_from_seeds(sample_seeds(0, [i])))[0]
        assert np.abs(alone.astype(int) - npz["arr_0"][i]).max() <= 2  # batch of 1 vs 3: float rounding
    # ... so two samples of one class differ, and so does another seed
    assert np.abs(npz["arr_0"][0].astype(int) - npz["arr_0"][1]).mean() > 5
    other = run(pipe_dir, tmp_path / "seed1", batch_size=3, format="npz", seed=1, **SMALL)
    assert np.abs(load_npz(other)["arr_0"].astype(int) - npz["arr_0"]).mean() > 5


def test_sample_seeds_are_distinct_in_torchs_32_bits():
    seeds = sample_seeds(0, range(100_000))
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert sample_seeds(0, [7]) != sample_seeds(1, [7])


def test_two_gloo_processes_match_one_process(tmp_path, pipe_dir):
    one = run(pipe_dir, tmp_path / "one", batch_size=3, format="npz", **SMALL)
    result = torchrun(pipe_dir, tmp_path / "two", "--format", "both")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 images (8 sampled now)" in result.stderr
    a, b = load_npz(one), load_npz(tmp_path / "two")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert png_names(tmp_path / "two") == [f"{i:06d}.png" for i in range(8)]
    assert not (one / "images").exists(), "--format npz drops the intermediate PNGs once the npz is written"


def test_killed_two_process_run_resumes_on_one_process(tmp_path, pipe_dir):
    reference = run(pipe_dir, tmp_path / "straight", batch_size=3, format="npz", **SMALL)
    # Each rank dies after its first 2 PNGs: mid-chunk, as a kill would leave it.
    result = torchrun(pipe_dir, tmp_path / "killed", "--format", "npz", "--stop-after", "2")
    assert result.returncode != 0 and "SimulatedKill" in result.stderr
    left = png_names(tmp_path / "killed")
    assert 0 < len(left) < 8 and not (tmp_path / "killed" / "samples.npz").exists()
    run(pipe_dir, tmp_path / "killed", batch_size=3, format="npz", **SMALL)
    np.testing.assert_array_equal(load_npz(reference)["arr_0"], load_npz(tmp_path / "killed")["arr_0"])


def test_resume_after_a_kill_and_after_deletions_equals_an_uninterrupted_run(tmp_path, pipe_dir, capsys):
    reference = load_npz(run(pipe_dir, tmp_path / "straight", batch_size=3, format="both", **SMALL))
    out = tmp_path / "resumed"
    with pytest.raises(SimulatedKill):
        run(pipe_dir, out, batch_size=3, format="both", stop_after=4, **SMALL)
    assert png_names(out) == [f"{i:06d}.png" for i in range(4)]  # chunk [3, 6) half written
    assert not (out / "samples.npz").exists()
    (out / "images" / ".000004.png.tmp-99999").write_bytes(b"\x89PNG half")  # a write the kill cut short
    kept = (out / "images" / "000001.png").stat()

    capsys.readouterr()
    run(pipe_dir, out, batch_size=3, format="both", **SMALL)
    assert "8 images (4 sampled now)" in capsys.readouterr().err
    assert png_names(out) == [f"{i:06d}.png" for i in range(8)]  # all there, no duplicates, no temp file
    assert (out / "images" / "000001.png").stat().st_mtime_ns == kept.st_mtime_ns  # done images not redone
    resumed = load_npz(out)
    np.testing.assert_array_equal(resumed["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(resumed["labels"], reference["labels"])

    for i in (2, 6):
        (out / "images" / f"{i:06d}.png").unlink()
    (out / "samples.npz").unlink()
    run(pipe_dir, out, batch_size=3, format="both", **SMALL)
    assert "8 images (2 sampled now)" in capsys.readouterr().err
    np.testing.assert_array_equal(load_npz(out)["arr_0"], reference["arr_0"])


def test_batch_size_changes_images_only_by_float_rounding(tmp_path, pipe_dir):
    # Batched matmuls round differently for other batch shapes, so a different batch size is equal up to
    # float rounding, not bitwise: at most a couple of uint8 levels, at a few pixels.
    a = load_npz(run(pipe_dir, tmp_path / "b3", batch_size=3, format="npz", **SMALL))["arr_0"].astype(int)
    b = load_npz(run(pipe_dir, tmp_path / "b5", batch_size=5, format="npz", **SMALL))["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 2
    assert (a != b).mean() < 0.01


def test_a_changed_argument_refuses_to_resume(tmp_path, pipe_dir, capsys):
    out = run(pipe_dir, tmp_path / "run", batch_size=3, format="png", **SMALL)
    changed = r"sampling: \{'guidance_scale': 2\.0, .* in the run, \{'guidance_scale': 3\.0, "
    with pytest.raises(ValueError, match=changed):
        run(pipe_dir, out, batch_size=3, format="png", **{**SMALL, "guidance_scale": 3.0})
    with pytest.raises(ValueError, match=r"(?s)per_class: 2 in the run, 3 now.*seed: 0 in the run, 1 now"):
        run(pipe_dir, out, batch_size=3, format="png", seed=1, **{**SMALL, "per_class": 3})
    # batch size and format do not define the samples: resuming with others is fine, with a note
    run(pipe_dir, out, batch_size=4, format="npz", **SMALL)
    assert "resuming with --batch-size 4 (the run began with 3)" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no run.json"):
        run(pipe_dir, tmp_path / "other", **SMALL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(per_class=-1), "--per-class must be an integer >= 1, got -1"),
    (dict(per_class=0), "--per-class"),
    (dict(batch_size=0), "--batch-size"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(format="jpg"), r"--format must be one of \('png', 'npz', 'both'\), got 'jpg'"),
    (dict(precision="fp16"), "--precision"),
    (dict(solver="heun"), "solver must be one of"),
    (dict(solver="flow-map"), "flow-map"),  # jumps need a flow-map head
    (dict(schedule="cosine"), "schedule must be one of"),
    (dict(cfg_schedule="step"), "cfg_schedule must be one of"),
    (dict(seed=-1), "--seed"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_interval=(0.5, 0.2)), "guidance_interval must satisfy"),
    (dict(num_samples=10), "not both"),
    (dict(per_class=None, num_samples=10), "--num-samples is for unconditional models"),
    (dict(num_classes=11), "--num-classes must be at most the model's 10, got 11"),
])
def test_bad_arguments_name_the_argument(tmp_path, pipe_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe_dir, tmp_path / "run", **{**SMALL, **kwargs})
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_and_missing_pipelines(tmp_path, pipe_dir, capsys):
    assert main([str(pipe_dir), "--out", str(tmp_path / "o"), "--format", "jpg"]) == 2
    assert "--format must be one of" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "nowhere", tmp_path / "o")


def test_unconditional_model_takes_num_samples(tmp_path, capsys):
    tiny_pipeline(num_classes=0).save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="unconditional: give --num-samples"):
        run(tmp_path / "pipe", tmp_path / "run", steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance_scale must be 1"):
        run(tmp_path / "pipe", tmp_path / "run", num_samples=5, guidance_scale=2.0, steps=2, progress=False)
    out = run(tmp_path / "pipe", tmp_path / "run", num_samples=5, batch_size=2, format="npz", steps=2, progress=False)
    npz = load_npz(out)
    assert set(npz) == {"arr_0"} and npz["arr_0"].shape == (5, 16, 16, 3)
    assert not (out / "labels.npy").exists() and not (out / "images").exists()
    capsys.readouterr()
    run(tmp_path / "pipe", out, num_samples=5, batch_size=2, format="npz", steps=2, progress=False)
    assert "5 images (0 sampled now)" in capsys.readouterr().err
    np.testing.assert_array_equal(load_npz(out)["arr_0"], npz["arr_0"])


def test_cli_runs_and_records_its_arguments(tmp_path, pipe_dir):
    out = tmp_path / "cli"
    argv = [str(pipe_dir), "--out", str(out), "--num-classes", "2", "--per-class", "1", "--steps", "2",
            "--guidance-interval", "0", "0.5", "--solver", "midpoint", "--precision", "bf16", "--format", "npz",
            "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    sampling = record["sampling"]
    assert sampling["guidance_interval"] == [0.0, 0.5] and sampling["solver"] == "midpoint"
    assert record["precision"] == "bf16" and sampling["guidance_scale"] == 2.0 and sampling["steps"] == 2
    npz = load_npz(out)
    assert npz["arr_0"].shape == (2, 16, 16, 3) and npz["labels"].tolist() == [0, 1]
    assert main([*argv, "--seed", "3"]) == 2  # resuming with another seed is refused


# ------------------------------------------------------------------------------------------------ VAR
@pytest.fixture(scope="module")
def var_dir(tmp_path_factory):
    """A random VAR on the tiny tokenizer (scales 1..4, 8x8 images), saved as a pipeline folder."""
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(get_msvq_preset("tiny"))
    model = VAR(get_var_preset("var-tiny", scales=(1, 2, 3, 4), vocab_size=32, code_dim=8, depth=2, width=64,
                               num_classes=4))
    path = tmp_path_factory.mktemp("var")
    VARPipeline(model, tokenizer).save_pretrained(path)
    return path


VAR_SMALL = dict(per_class=3, progress=False)


def test_var_samples_are_the_pipelines_images_for_their_own_uniforms(tmp_path, var_dir):
    # VAR's own convention (cfg 1.5) is guidance_scale 1 + 1.5 = 2.5 in ours.
    out = run(var_dir, tmp_path / "run", batch_size=5, format="both", var_cfg=1.5, top_k=10, **VAR_SMALL)
    npz = load_npz(out)
    assert npz["arr_0"].shape == (12, 8, 8, 3) and npz["labels"].tolist() == [c for c in range(4) for _ in range(3)]
    record = json.loads((out / "run.json").read_text())
    sampling = record["sampling"]
    assert (sampling["guidance_scale"], sampling["top_k"], sampling["top_p"]) == (2.5, 10, 0.0)
    assert "steps" not in sampling
    pipe = load_pipeline(var_dir)
    for i in (0, 7, 11):
        # Sample i alone, as token maps, with the uniforms of seed (0, i); decode them here through the
        # tokenizer and turn [-1, 1] into uint8 by hand: the run's image i, up to float rounding.
        tokens = pipe([i // 3], output_type="latent", guidance_scale=2.5, top_k=10,
                      noise=pipe.model.noise_from_seeds(sample_seeds(0, [i])))
        assert [tuple(t.shape) for t in tokens] == [(1, s, s) for s in (1, 2, 3, 4)]
        with torch.no_grad():
            decoded = pipe.tokenizer.decode_indices(tokens)[0]  # (3, 8, 8) in [-1, 1]
        pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int)
        assert np.abs(pixels - npz["arr_0"][i]).max() <= 2  # batch of 1 vs 5: float rounding
    assert np.abs(npz["arr_0"][0].astype(int) - npz["arr_0"][1]).mean() > 1  # own uniforms, own image


def test_var_tokens_do_not_depend_on_the_batch_size(tmp_path, var_dir):
    a = load_npz(run(var_dir, tmp_path / "b2", batch_size=2, format="npz", **VAR_SMALL))["arr_0"].astype(int)
    b = load_npz(run(var_dir, tmp_path / "b5", batch_size=5, format="npz", **VAR_SMALL))["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.01


def test_var_run_resumes_after_a_kill_bit_identically(tmp_path, var_dir):
    whole = load_npz(run(var_dir, tmp_path / "whole", batch_size=3, format="npz", **VAR_SMALL))["arr_0"]
    with pytest.raises(SimulatedKill):
        run(var_dir, tmp_path / "killed", batch_size=3, format="npz", stop_after=4, **VAR_SMALL)
    resumed = load_npz(run(var_dir, tmp_path / "killed", batch_size=3, format="npz", **VAR_SMALL))["arr_0"]
    np.testing.assert_array_equal(resumed, whole)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=4), "steps is not a sampling option of VARSampling"),
    (dict(solver="midpoint"), "solver is not a sampling option of VARSampling"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=1.5), r"top_p must lie in \[0, 1\]"),
])
def test_var_refuses_options_it_does_not_have(tmp_path, var_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(var_dir, tmp_path / "run", **{**VAR_SMALL, **kwargs})
    assert not (tmp_path / "run").exists()


def test_flowar_refuses_var_options(tmp_path, pipe_dir):
    with pytest.raises(ValueError, match="top_k is not a sampling option of FlowARSampling"):
        run(pipe_dir, tmp_path / "run", top_k=5, **SMALL)


def test_flexvar_samples_other_scale_lists_each_from_its_own_uniforms(tmp_path):
    """eval.sample over a FlexVAR release at a list of sides given on the command line: larger images for a larger
    last side, each image the pipeline's own for the uniforms of its seed, the list recorded in run.json."""
    from flowar import FlexVAR, FlexVARPipeline, get_flexvar_preset
    from vae.flexvq import FlexVQVAE, get_flexvq_preset

    torch.manual_seed(0)
    FlexVARPipeline(FlexVAR(get_flexvar_preset("flexvar-tiny", depth=2, width=64, num_heads=2)),
                    FlexVQVAE(get_flexvq_preset("mnist"))).save_pretrained(tmp_path / "flexvar")
    out = tmp_path / "run"
    assert main([str(tmp_path / "flexvar"), "--out", str(out), "--per-class", "1", "--num-classes", "3",
                 "--batch-size", "2", "--scales", "1,2,4,8,12", "--top-k", "8", "--format", "npz", "--no-progress"]) == 0
    npz = load_npz(out)
    assert npz["arr_0"].shape == (3, 48, 48, 3)
    assert json.loads((out / "run.json").read_text())["sampling"]["scales"] == [1, 2, 4, 8, 12]
    pipe = load_pipeline(tmp_path / "flexvar")
    options = pipe.model.sampling_options(scales=(1, 2, 4, 8, 12), top_k=8)
    alone = pipe([2], output_type="np", sampling=options, noise=pipe.model.noise_from_seeds(sample_seeds(0, [2]), options))
    assert np.abs(alone[0].astype(int) - npz["arr_0"][2]).max() <= 2  # batch of 1 vs 2: float rounding
    assert main([str(tmp_path / "flexvar"), "--out", str(tmp_path / "bad"), "--scales", "1,2,64"]) == 2
