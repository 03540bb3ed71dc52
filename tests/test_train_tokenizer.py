"""The tokenizer trainer's config and CLI (train.tokenizer_config, train.train_tokenizer.main).

The loss, dead-code and discriminator behaviour tests live with the tokenizer in tests/test_msvq.py.
"""

import dataclasses
import json

import pytest
import torch

from train import train_tokenizer as tt
from train.config import load_config, load_dataclass
from train.tokenizer_config import TokenizerConfig, load_tokenizer_config

# A run of the trainer that takes about a second: the 4-scale test preset at 8 px, a batch of 4, 2 steps.
FAST = ["preset=tiny", "steps=2", "batch_size=4", "eval_images=4", "warmup=1", "progress=false"]


@pytest.fixture
def spies(monkeypatch):
    """Record every AdamW the trainer builds and every max_norm it clips the gradients to."""
    made, clips = [], []
    real_clip = torch.nn.utils.clip_grad_norm_

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def recording_clip(parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    return made, clips


def test_config_loads_from_yaml_then_overrides(tmp_path):
    file = tmp_path / "tok.yaml"
    file.write_text("preset: tiny\nsteps: 7\nbetas: [0.8, 0.99]\nmodel:\n  codebook_size: 16\ngrad_clip: 2.0\n")
    cfg = load_tokenizer_config(str(file), ["steps=9", "model.beta=0.1", "betas=0.5,0.9", "lr=2e-4",
                                            "tensorboard=true"])
    assert (cfg.preset, cfg.steps, cfg.grad_clip, cfg.lr, cfg.tensorboard) == ("tiny", 9, 2.0, 2e-4, True)
    assert cfg.betas == (0.5, 0.9) and isinstance(cfg.betas, tuple)
    assert cfg.model == {"codebook_size": 16, "beta": 0.1}
    assert cfg.msvq_config().codebook_size == 16 and cfg.msvq_config().beta == 0.1
    # Defaults are written once, in the dataclass: no file and no overrides give exactly them.
    assert load_tokenizer_config() == TokenizerConfig()
    # The same helper reads TrainConfig, and a pair written with a comma works there too.
    assert load_config(None, ["betas=0.5,0.9"]).betas == (0.5, 0.9)
    assert load_dataclass(TokenizerConfig, None, ["betas=(0.3, 0.4)"]).betas == (0.3, 0.4)


@pytest.mark.parametrize("overrides, key", [
    (["stepz=3"], "stepz"),
    (["steps=abc"], "steps"),
    (["steps=2.5"], "steps"),
    (["betas=0.5"], "betas"),
    (["betas=0.5,0.9,0.99"], "betas"),
    (["grad_clip=abc"], "grad_clip"),
    (["grad_clip=-1"], "grad_clip"),
    (["gan_lr=[1]"], "gan_lr"),
    (["tensorboard=maybe"], "tensorboard"),
    (["model.colour=red"], "model.colour"),
    (["model=3"], "model"),
    (["recon=l3"], "recon"),
    (["preset=tiny", "image_size=32"], "image_size"),
    (["steps"], "key=value"),
])
def test_a_bad_key_or_value_fails_naming_it(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_tokenizer_config(None, overrides)


def test_the_cli_names_the_bad_key_and_the_replaced_flags(tmp_path, capsys):
    assert tt.main(["--out", str(tmp_path / "run"), "gan_lr=fast"]) == 2
    assert "'gan_lr'" in capsys.readouterr().err
    file = tmp_path / "tok.yaml"
    file.write_text("grad_clipp: 1.0\n")
    assert tt.main(["--config", str(file)]) == 2
    assert "grad_clipp" in capsys.readouterr().err
    assert tt.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the old --flags are gone; the error says what replaced them
        tt.main(["--batch-size", "16"])
    assert "batch_size=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a bad config fails before anything is written


def test_cli_betas_grad_clip_and_gan_lr_reach_the_optimisers(tmp_path, spies):
    made, clips = spies
    out = tmp_path / "run"
    argv = ["--out", str(out), *FAST, "lr=1e-3", "betas=0.5,0.9", "grad_clip=0.25", "gan_weight=0.1",
            "gan_lr=3e-4", "gan_betas=0.4,0.8", "dead_after=0"]
    assert tt.main(argv) == 0
    tokenizer_opt, disc_opt = made
    assert all(group["betas"] == (0.5, 0.9) for group in tokenizer_opt.param_groups)
    assert tokenizer_opt.param_groups[0]["params"][0] is not disc_opt.param_groups[0]["params"][0]
    assert [group["lr"] for group in disc_opt.param_groups] == [3e-4]  # not lr, and not on lr's schedule
    assert disc_opt.param_groups[0]["betas"] == (0.4, 0.8)
    assert clips == [0.25, 0.25]  # one clip per step, to the configured norm
    # The run records its settings, and --config reads them back to the same config.
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["betas"], saved["grad_clip"], saved["gan_lr"], saved["out_dir"]) == ([0.5, 0.9], 0.25, 3e-4, str(out))
    assert load_tokenizer_config(str(out / "train_config.json")) == load_tokenizer_config(None, argv[2:] + [
        f"out_dir={out}"])
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_the_keyword_form_and_the_defaults_of_the_python_api(tmp_path, spies):
    """``train_tokenizer(folder, **fields)`` (train.demo's call) and ``train_tokenizer(config, **fields)``."""
    made, clips = spies
    result = tt.train_tokenizer(tmp_path / "run", preset="tiny", steps=1, batch_size=4, eval_images=4, warmup=1,
                                grad_clip=0.0, gan_weight=0.1, progress=False)
    assert clips == []  # grad_clip 0: no clipping
    tokenizer_opt, disc_opt = made
    assert tokenizer_opt.param_groups[0]["betas"] == TokenizerConfig.betas
    assert disc_opt.param_groups[0]["lr"] == TokenizerConfig.lr  # gan_lr 0: the tokenizer's lr
    assert result["steps"] == 1
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["out_dir"] == str(tmp_path / "run")
    base = TokenizerConfig(out_dir=str(tmp_path / "other"), preset="tiny", steps=1, batch_size=4, eval_images=4)
    with pytest.raises(ValueError, match="stepz"):
        tt.train_tokenizer(base, stepz=2)
    with pytest.raises(ValueError, match="steps"):
        tt.train_tokenizer(base, steps=0)
    with pytest.raises(ValueError, match="config"):
        tt.train_tokenizer({"steps": 1})
    assert dataclasses.replace(base, steps=2).steps == 2 and not (tmp_path / "other").exists()
