"""The training loop: process splits, kill and resume, NaN stop, checkpoints, TensorBoard, config."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_autoencoder_kl, tiny_flowar

from train.cache_latents import write_cache
from train.checkpoint import CheckpointManager
from train.config import load_config
from train.latents import CachedLatents

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["global_batch=8", "warmup_steps=2", "lr=1e-3", "sample_every=0", "progress=false", "log_every=1"]


def make_cache(folder, *, n=48, nan_item=None, vae=""):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    mean = torch.randn(10, 4, 8, 8, generator=g)[labels] + 0.1 * torch.randn(n, 4, 8, 8, generator=g)
    std = torch.full((n, 4, 8, 8), 0.05)
    if nan_item is not None:
        mean[nan_item] = float("nan")
    shards = [{"mean": mean, "std": std, "mean_flip": mean.flip(-1), "std_flip": std, "labels": labels}]
    return write_cache(folder, shards, classes=list(range(10)), vae=vae)


def run_train(args, *, nproc=1, check=True, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        # --standalone: torchrun picks a free port itself, where a fixed one can be held by another program
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "train.train", *args]
    else:
        cmd = [sys.executable, "-m", "train.train", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as hung:
        text = [o.decode() if isinstance(o, bytes) else (o or "") for o in (hung.stdout, hung.stderr)]
        raise AssertionError("training did not finish in 300 s; its output until then:\n" + "\n".join(text)) from None
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def final_state(run_dir):
    return torch.load(Path(run_dir) / "checkpoint-last.pt", weights_only=True)


def assert_same_weights(a, b, **tol):
    assert a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], **tol, msg=lambda m: f"{key}: {m}")
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], **tol)


def test_two_gloo_processes_match_one_process_at_double_batch(tmp_path):
    cache = make_cache(tmp_path / "cache")
    common = [f"latent_cache={cache}", *COMMON, "total_steps=4", "checkpoint_every=4"]
    run_train([*common, f"out_dir={tmp_path / 'one'}"])
    run_train([*common, f"out_dir={tmp_path / 'two'}"], nproc=2)  # 2 processes x 4 images
    run_train([*common, f"out_dir={tmp_path / 'accum'}", "grad_accum=2"])  # 1 process, 2 x 4 images
    one, two, accum = (final_state(tmp_path / d) for d in ("one", "two", "accum"))
    assert_same_weights(one, two, rtol=1e-4, atol=1e-5)
    assert_same_weights(one, accum, rtol=1e-4, atol=1e-5)
    start = torch.load(tmp_path / "one" / "checkpoint-last.pt", weights_only=True)
    assert start["optimizer"]["state"], "the optimizer really stepped"


def test_ema_bias_correction_averages_only_trained_weights():
    """n updates give sum_i (1 - d) d**(n - i) theta_i / (1 - d**n) with the correction, and keep d**n of the
    initial weights without it; the weights' sequence here is arbitrary."""
    from train.train import ema_decay, update_ema

    decay, thetas = 0.9, [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([5.0]), torch.tensor([2.0])]
    init = torch.tensor([100.0])
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(init.clone())
    corrected, plain = {"w": init.clone()}, {"w": init.clone()}
    for n, theta in enumerate(thetas, start=1):
        module.w.data.copy_(theta)
        update_ema(corrected, module, ema_decay(decay, n, bias_correction=True))
        update_ema(plain, module, ema_decay(decay, n, bias_correction=False))
        weights = [(1 - decay) * decay ** (n - i) for i in range(1, n + 1)]
        average = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        torch.testing.assert_close(corrected["w"], average)
        torch.testing.assert_close(plain["w"], decay ** n * init + sum(w * t for w, t in zip(weights, thetas)))
    assert ema_decay(decay, 1, bias_correction=True) == 0.0  # the first update copies the weights
    assert ema_decay(0.9999, 10**6, bias_correction=True) == pytest.approx(0.9999, abs=1e-12)


def test_ema_after_one_step_is_the_trained_weights_unless_uncorrected(tmp_path):
    cache = make_cache(tmp_path / "cache")
    common = [f"latent_cache={cache}", *COMMON, "total_steps=1", "checkpoint_every=1", "ema=0.9"]
    run_train([*common, f"out_dir={tmp_path / 'corrected'}"])
    run_train([*common, f"out_dir={tmp_path / 'plain'}", "ema_bias_correction=false"])
    corrected, plain = final_state(tmp_path / "corrected"), final_state(tmp_path / "plain")
    for key, value in corrected["ema"].items():
        assert torch.equal(value, corrected["model"][key].float()), key
        assert torch.equal(plain["model"][key], corrected["model"][key])  # the EMA does not touch training
    assert any(not torch.allclose(plain["ema"][k], plain["model"][k].float()) for k in plain["ema"])


def test_killed_run_resumes_to_identical_weights(tmp_path):
    cache = make_cache(tmp_path / "cache")
    common = [f"latent_cache={cache}", *COMMON, "total_steps=12", "checkpoint_every=3"]
    run_train([*common, f"out_dir={tmp_path / 'straight'}"])
    # Start a second run, SIGKILL it once it has saved step 6 or later, then resume it.
    proc = run_train([*common, f"out_dir={tmp_path / 'killed'}"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    manager = CheckpointManager(tmp_path / "killed")
    deadline = time.time() + 240
    while time.time() < deadline:
        if manager.last_path.exists():
            try:
                if torch.load(manager.last_path, weights_only=True)["step"] >= 6:
                    break
            except Exception:
                pass  # mid-rename; look again
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = manager.load_last()["step"]
    assert 6 <= killed_at <= 12
    run_train([*common, f"out_dir={tmp_path / 'killed'}", "--resume"])
    assert_same_weights(final_state(tmp_path / "straight"), final_state(tmp_path / "killed"), rtol=0, atol=0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Clean data and a learning rate far past stable: AdamW's first updates throw the weights to about 1e30, and
    # a later forward overflows. The loop must stop there, with the checkpoint of the step before untouched.
    cache = make_cache(tmp_path / "cache")
    result = run_train([f"latent_cache={cache}", *COMMON, "lr=1e30", "warmup_steps=0", "total_steps=40",
                        "checkpoint_every=1", f"out_dir={tmp_path / 'run'}"], check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    stopped = re.search(r"loss is (nan|inf|-inf) at step (\d+)", result.stderr)
    assert stopped and "left untouched" in result.stderr, result.stderr[-2000:]
    state = CheckpointManager(tmp_path / "run").load_last()
    assert state["step"] == int(stopped.group(2)) >= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list((tmp_path / "run").glob(".checkpoint-*"))


def test_a_latent_cache_with_nan_is_refused_when_read(tmp_path):
    cache = make_cache(tmp_path / "cache", nan_item=7)
    with pytest.raises(ValueError, match=r"latent_cache .* NaN or infinite values in 'mean' \(1 items\)"):
        CachedLatents(cache)


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1, "w": torch.ones(3)})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        manager.save({"step": 2, "w": torch.zeros(3)})
    assert manager.load_last()["step"] == 1
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_tensorboard_logs_scalars_and_the_sample_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_autoencoder_kl().save_pretrained(tmp_path / "vae")
    cache = make_cache(tmp_path / "cache", vae=str(tmp_path / "vae"))
    run_train([f"latent_cache={cache}", *COMMON[:-2], "total_steps=4", "checkpoint_every=4", "sample_every=2",
               "log_every=2", f"out_dir={tmp_path / 'run'}", "model.sampling={steps: 2}"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/grad_norm", "train/lr", "train/images_per_sec"} | {
        f"train/loss_scale_{s}x{s}" for s in (1, 2, 4, 8)}
    assert expected <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    images = events.Images("samples/ema_grid")
    assert [e.step for e in images] == [2, 4] and images[0].width > 16 * 8

    # export: the EMA weights (not the live ones) become a release folder that the pipeline loads
    from flowar import FlowARPipeline
    from train.export import export

    export(tmp_path / "run", tmp_path / "release")
    pipe = FlowARPipeline.from_pretrained(tmp_path / "release")
    assert pipe.model.config.sampling.steps == 2  # model.sampling={...} updated the preset's saved defaults
    assert pipe.class_names == [str(i) for i in range(10)]  # the cache's class list, for applications
    state = final_state(tmp_path / "run")
    loaded = dict(pipe.model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in state["ema"].items())
    assert any(not torch.equal(state["model"][k], v) for k, v in state["ema"].items())
    assert pipe([0, 1], output_type="np", steps=2).shape == (2, 16, 16, 3)


def test_config_file_overrides_and_type_errors(tmp_path):
    file = tmp_path / "cfg.yaml"
    file.write_text("global_batch: 16\nmodel:\n  num_classes: 5\nbetas: [0.9, 0.99]\n")
    cfg = load_config(str(file), ["lr=0.001", "model.width=32", "bf16=true"])
    assert (cfg.global_batch, cfg.lr, cfg.bf16, cfg.betas) == (16, 0.001, True, (0.9, 0.99))
    assert cfg.model == {"num_classes": 5, "width": 32}
    with pytest.raises(ValueError, match="global_batch"):
        load_config(None, ["global_batch=abc"])
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(None, ["learning_rat=1"])
    with pytest.raises(ValueError, match="grad_accum"):
        load_config(None, ["global_batch=10", "grad_accum=3"])
    with pytest.raises(FileNotFoundError, match="config file"):
        load_config(str(tmp_path / "none.yaml"))


def test_online_path_on_an_image_folder_with_a_corrupt_file(tmp_path):
    """The online-encoding path: a folder with a broken file trains; the file is reported, not fatal."""
    import numpy as np
    from PIL import Image

    tiny_autoencoder_kl().save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    (tmp_path / "images" / "dog" / "broken.png").write_bytes(b"not a png at all")
    result = run_train([f"data={tmp_path / 'images'}", f"vae={tmp_path / 'vae'}", "image_size=16", *COMMON,
                        "total_steps=3", "checkpoint_every=3", "model.num_classes=2", f"out_dir={tmp_path / 'run'}",
                        "model.sampling={steps: 2}", "fid_every=3", "fid_samples=6"])
    assert "broken.png" in result.stdout
    state = final_state(tmp_path / "run")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())

    # In-training FID against the training folder (the broken file is skipped there too), logged once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fid = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Scalars("eval/fid")
    assert [e.step for e in fid] == [3] and fid[0].value > 0 and np.isfinite(fid[0].value)


def test_in_training_fid_needs_a_known_reference(tmp_path):
    cache = make_cache(tmp_path / "cache")  # written without a data source
    result = run_train([f"latent_cache={cache}", *COMMON, "total_steps=2", "fid_every=1",
                        f"out_dir={tmp_path / 'run'}"], check=False)
    assert result.returncode == 2 and "fid_reference" in result.stderr


def test_var_trains_with_the_same_loop_on_a_token_cache(tmp_path):
    """VAR: tokens cached by the tokenizer (with mirror images), the same loop, grids, accumulation, export."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowar import VAR
    from train.cache_latents import cache_latents
    from train.data import ImageFolderDataset
    from vae.msvq import MultiScaleVQVAE, get_msvq_preset

    torch.manual_seed(0)
    MultiScaleVQVAE(get_msvq_preset("mnist")).save_pretrained(tmp_path / "tokenizer")  # matches var-tiny
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    from train.latents import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    cache = cache_latents(ImageFolderDataset(tmp_path / "images", image_size=32, train=False), tokenizer,
                          tmp_path / "tokens", vae_path=str(tmp_path / "tokenizer"), progress=False)
    common = [f"latent_cache={cache}", *COMMON[:-2], "log_every=2", "preset=var-tiny", "model.num_classes=2",
              "total_steps=4", "checkpoint_every=4"]
    run_train([*common, f"out_dir={tmp_path / 'one'}", "sample_every=4"])
    run_train([*common, f"out_dir={tmp_path / 'accum'}", "grad_accum=2"])
    one, accum = final_state(tmp_path / "one"), final_state(tmp_path / "accum")
    assert_same_weights(one, accum, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in one["model"].values())

    events = EventAccumulator(str(tmp_path / "one" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/loss_scale_8x8"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples/ema_grid")] == [4]

    from train.export import export

    export(tmp_path / "one", tmp_path / "release")
    model = VAR.from_pretrained(tmp_path / "release")
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in one["ema"].items())
    released_tokenizer = load_tokenizer(str(tmp_path / "release" / "tokenizer"))
    images = released_tokenizer.decode_indices(model.sample([0, 1], tokenizer=released_tokenizer).indices)
    assert images.shape == (2, 3, 32, 32)


def test_flexvar_trains_on_random_scale_lists_with_the_same_loop(tmp_path):
    """FlexVAR: its tokenizer's features cached (kind "latents", the tokenizer recorded), a new list of sides at
    every step shared by the accumulation steps, online encoding, export, and a release that samples larger."""
    import json

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowar.registry import load_pipeline
    from train.cache_latents import cache_latents
    from train.data import ImageFolderDataset
    from train.latents import load_tokenizer
    from vae.flexvq import FlexVQVAE, get_flexvq_preset

    torch.manual_seed(0)
    FlexVQVAE(get_flexvq_preset("mnist")).save_pretrained(tmp_path / "tokenizer")  # matches flexvar-tiny
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    cache = cache_latents(ImageFolderDataset(tmp_path / "images", image_size=32, train=False), tokenizer,
                          tmp_path / "features", vae_path=str(tmp_path / "tokenizer"), progress=False)
    index = json.loads((cache / "cache.json").read_text())
    assert index["kind"] == "latents" and index["tokenizer"] == str(tmp_path / "tokenizer") and not index["vae"]
    common = [f"latent_cache={cache}", *COMMON[:-2], "log_every=1", "preset=flexvar-tiny", "model.num_classes=2",
              "model.fixed_list_share=0.0", "total_steps=4", "checkpoint_every=4"]
    run_train([*common, f"out_dir={tmp_path / 'one'}", "sample_every=4"])
    run_train([*common, f"out_dir={tmp_path / 'accum'}", "grad_accum=2"])
    one, accum = final_state(tmp_path / "one"), final_state(tmp_path / "accum")
    assert_same_weights(one, accum, rtol=1e-4, atol=1e-5)
    events = EventAccumulator(str(tmp_path / "one" / "tensorboard"), size_guidance={"images": 0}).Reload()
    per_side = {tag for tag in events.Tags()["scalars"] if tag.startswith("train/loss_scale_")}
    assert "train/loss" in events.Tags()["scalars"] and len(per_side) > 4  # sides of several lists
    assert [e.step for e in events.Images("samples/ema_grid")] == [4]

    run_train([f"data={tmp_path / 'images'}", f"tokenizer={tmp_path / 'tokenizer'}", *COMMON, "preset=flexvar-tiny",
               "model.num_classes=2", "total_steps=1", f"out_dir={tmp_path / 'online'}"])
    assert final_state(tmp_path / "online")["step"] == 1

    from train.export import export

    export(tmp_path / "one", tmp_path / "release")
    pipe = load_pipeline(tmp_path / "release")
    loaded = dict(pipe.model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in one["ema"].items())
    assert pipe([0, 1], output_type="pt", scales=(1, 2, 4, 8, 12)).shape == (2, 3, 48, 48)


def test_xar_trains_with_noisy_context_in_the_same_loop(tmp_path):
    """xAR: every cell at its own noise level in one block-causal pass, from the same latent cache and loop; the
    draws are per image, so two accumulation steps equal one step of the whole batch; export gives a release."""
    from flowar.registry import load_pipeline
    from train.export import export

    tiny_autoencoder_kl().save_pretrained(tmp_path / "vae")
    cache = make_cache(tmp_path / "cache", vae=str(tmp_path / "vae"))
    common = [f"latent_cache={cache}", *COMMON, "preset=xar-tiny", "total_steps=3", "checkpoint_every=3"]
    run_train([*common, f"out_dir={tmp_path / 'one'}"])
    run_train([*common, f"out_dir={tmp_path / 'accum'}", "grad_accum=2"])
    one, accum = final_state(tmp_path / "one"), final_state(tmp_path / "accum")
    assert_same_weights(one, accum, rtol=1e-4, atol=1e-5)
    export(tmp_path / "one", tmp_path / "release")
    pipe = load_pipeline(tmp_path / "release")
    assert type(pipe.model).__name__ == "XAR"
    assert pipe([1, 2], output_type="latent", steps=3).shape == (2, 4, 8, 8)


def test_var_refuses_a_vae_latent_cache(tmp_path):
    cache = make_cache(tmp_path / "cache")
    result = run_train([f"latent_cache={cache}", *COMMON, "preset=var-tiny", "total_steps=1",
                        f"out_dir={tmp_path / 'run'}"], check=False)
    assert result.returncode == 2 and "trains on tokens" in result.stderr and "gives latents" in result.stderr


@pytest.mark.parametrize("family", ["flowar", "xar"])
def test_a_data_source_of_another_shape_is_refused_naming_the_fields_to_set(family):
    """The trainer's check of its data against a latent family: the source's item shape, the model's, and the
    config fields that set it."""
    from types import SimpleNamespace

    from flowar import XAR, get_xar_preset

    model = tiny_flowar() if family == "flowar" else XAR(get_xar_preset("xar-tiny"))
    fields = "model.token_dim / model.scales" if family == "flowar" else "model.token_dim / model.latent_side"
    model.check_training_source(SimpleNamespace(latent_shape=(4, 8, 8)))  # the model's own: accepted
    with pytest.raises(ValueError, match=rf"latents are \(8, 8, 8\) but the model expects \(4, 8, 8\); set {fields}"):
        model.check_training_source(SimpleNamespace(latent_shape=(8, 8, 8)))
