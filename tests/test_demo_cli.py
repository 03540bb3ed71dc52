"""train.demo's arguments: combinations it refuses before any training starts, with the flag named."""

import pytest

from train import demo


@pytest.mark.parametrize("argv, message", [
    (["--autoencoder", "runs/demo/vae", "--vae-steps", "10"], "--vae-steps trains an autoencoder and --autoencoder reuses one"),
    (["--set", "lr"], "--set takes KEY=VALUE, got 'lr'"),
    (["--fid", "--per-class", "0"], "--fid needs samples to score"),
    (["--model", "var", "--latent-norm", "per-channel"], "are options of FlowAR's VAE; VAR's tokenizer has none"),
    (["--model", "var", "--kl-weight", "1e-4"], "are options of FlowAR's VAE; VAR's tokenizer has none"),
    (["--model", "var", "--vae-channels", "16,32,64"], "are options of FlowAR's VAE; VAR's tokenizer has none"),
    (["--autoencoder", "runs/demo/vae", "--kl-weight", "1e-4"], "train a VAE and --autoencoder reuses one"),
    (["--autoencoder", "runs/demo/vae", "--vae-channels", "16,32,64"], "train a VAE and --autoencoder reuses one"),
    (["--vae-channels", "16,24,64"], "--vae-channels must be 3 positive multiples of 16"),
    (["--vae-channels", "16,32"], "--vae-channels must be 3 positive multiples of 16"),
    (["--vae-channels", "wide"], "--vae-channels must be 3 positive multiples of 16"),
    (["--kl-weight", "-1"], "--kl-weight must be a finite number >= 0, got -1.0"),
    (["--kl-weight", "inf"], "--kl-weight must be a finite number >= 0, got inf"),
])
def test_bad_combinations_exit_with_the_flag_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_missing_autoencoder_folder_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "out"), "--autoencoder", str(tmp_path / "nowhere")])
    assert "--autoencoder" in capsys.readouterr().err


def test_renormalizing_a_vae_into_its_own_folder_is_refused(tmp_path, capsys):
    vae = tmp_path / "run" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "run"), "--autoencoder", str(vae), "--latent-norm", "per-channel"])
    assert "--latent-norm with --autoencoder writes OUT/vae" in capsys.readouterr().err
    assert (vae / "config.json").read_text() == "{}"  # the reused VAE is untouched
