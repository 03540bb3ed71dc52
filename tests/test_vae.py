"""DiffusersVAE on a tiny random diffusers AutoencoderKL (conftest.tiny_autoencoder_kl): shapes, scaling,
posterior, save/load, errors."""

import json

import pytest
import torch
from conftest import tiny_autoencoder_kl
from diffusers import AutoencoderKL

import vae.diffusers_vae as diffusers_vae
from vae import DiffusersVAE, LatentAutoencoder


def images(batch: int = 2, side: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=g) * 2 - 1


def posterior(autoencoder: AutoencoderKL, x: torch.Tensor):
    with torch.no_grad():
        return autoencoder.encode(x).latent_dist


def test_satisfies_protocol():
    assert isinstance(DiffusersVAE(tiny_autoencoder_kl()), LatentAutoencoder)
    assert not isinstance(torch.nn.Linear(2, 2), LatentAutoencoder)


def test_properties_and_defaults_from_config():
    vae = DiffusersVAE(tiny_autoencoder_kl())
    assert (vae.latent_channels, vae.downsample) == (4, 2)
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.0)  # shift_factor None in config -> 0
    vae = DiffusersVAE(tiny_autoencoder_kl(shift_factor=0.1))
    assert vae.shift_factor == 0.1
    vae = DiffusersVAE(tiny_autoencoder_kl(shift_factor=0.1), scaling_factor=2.0, shift_factor=-1.0)
    assert (vae.scaling_factor, vae.shift_factor) == (2.0, -1.0)
    three_levels = tiny_autoencoder_kl(
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    assert DiffusersVAE(three_levels).downsample == 4


@torch.no_grad()
def test_encode_decode_shapes():
    vae = DiffusersVAE(tiny_autoencoder_kl())
    z = vae.encode(images(2, 16), generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8)
    assert vae.decode(z).shape == (2, 3, 16, 16)
    assert vae.encode(images(1, 24)).shape == (1, 4, 12, 12)  # non-square multiples work too


@torch.no_grad()
def test_scaling_applied_both_ways():
    autoencoder = tiny_autoencoder_kl()
    vae = DiffusersVAE(autoencoder, scaling_factor=0.4, shift_factor=0.3, sample_posterior=False)
    x = images()
    mean = posterior(autoencoder, x).mean
    z = vae.encode(x)
    torch.testing.assert_close(z, (mean - 0.3) * 0.4)
    torch.testing.assert_close(vae.decode(z), autoencoder.decode(mean).sample, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_posterior_sample_follows_generator():
    autoencoder = tiny_autoencoder_kl()
    vae = DiffusersVAE(autoencoder, scaling_factor=2.0)
    x = images()
    a = vae.encode(x, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    c = vae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    expected = posterior(autoencoder, x).sample(generator=torch.Generator().manual_seed(1)) * 2.0
    torch.testing.assert_close(a, expected)
    mean = DiffusersVAE(autoencoder, scaling_factor=2.0, sample_posterior=False).encode(x)
    assert not torch.allclose(a, mean)


@torch.no_grad()
@pytest.mark.parametrize("shift", [False, True])
def test_estimate_scaling_gives_unit_std_on_its_batch(shift):
    vae = DiffusersVAE(tiny_autoencoder_kl())
    x = images(4)
    scale, shift_factor = vae.estimate_scaling(x, shift=shift, generator=torch.Generator().manual_seed(3))
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.0)  # estimating changes nothing
    if not shift:
        assert shift_factor == 0.0
    vae.set_scaling(scale, shift_factor)
    z = vae.encode(x, generator=torch.Generator().manual_seed(3)).double()
    assert z.std().item() == pytest.approx(1.0, abs=1e-5)
    if shift:
        assert z.mean().item() == pytest.approx(0.0, abs=1e-5)
    else:
        assert abs(z.mean().item()) > 1e-3  # this random model's latents are not centred


def test_set_scaling_rejects_bad_values():
    vae = DiffusersVAE(tiny_autoencoder_kl())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scaling_factor"):
            vae.set_scaling(bad)
    with pytest.raises(ValueError, match="shift_factor"):
        vae.set_scaling(1.0, float("nan"))


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    vae = DiffusersVAE(tiny_autoencoder_kl(), sample_posterior=False)
    vae.set_scaling(0.7, -0.2)
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (0.7, -0.2)

    loaded = DiffusersVAE.from_pretrained(tmp_path / "vae", sample_posterior=False)
    assert (loaded.scaling_factor, loaded.shift_factor) == (0.7, -0.2)
    original, restored = vae.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = images()
    torch.testing.assert_close(loaded.encode(x), vae.encode(x))

    # The same folder through subfolder=, with a dtype and an explicit override.
    again = DiffusersVAE.from_pretrained(tmp_path, subfolder="vae", torch_dtype=torch.float64, scaling_factor=3.0)
    assert again.dtype == torch.float64 and again.scaling_factor == 3.0 and again.shift_factor == -0.2


@torch.no_grad()
def test_channel_stats_applied_both_ways():
    """diffusers' latents_mean / latents_std (SDXL convention): each channel shifted and divided before the
    global factor, and undone exactly before decoding."""
    autoencoder = tiny_autoencoder_kl()
    mean_c, std_c = (0.5, -1.0, 0.0, 2.0), (1.0, 0.5, 4.0, 2.0)
    vae = DiffusersVAE(autoencoder, scaling_factor=0.4, shift_factor=0.1, sample_posterior=False)
    vae.set_scaling(0.4, 0.1, latents_mean=mean_c, latents_std=std_c)
    x = images()
    raw = posterior(autoencoder, x).mean
    z = vae.encode(x)
    for c in range(4):
        torch.testing.assert_close(z[:, c], (raw[:, c] - 0.1 - mean_c[c]) * 0.4 / std_c[c])
    torch.testing.assert_close(vae.decode(z), autoencoder.decode(raw).sample, rtol=1e-5, atol=1e-5)
    # The cached (mean, std) still give exactly the posterior samples encode draws.
    vae.sample_posterior = True
    mean, std = vae.encode_distribution(x)
    eps = torch.randn(raw.shape, generator=torch.Generator().manual_seed(5))
    sample = posterior(autoencoder, x).mean + posterior(autoencoder, x).std * eps
    torch.testing.assert_close(mean + std * eps, vae._to_scaled(sample), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_estimate_channel_stats_gives_unit_channels():
    vae = DiffusersVAE(tiny_autoencoder_kl(), sample_posterior=False)
    x = images(4)
    mean_c, std_c = vae.estimate_channel_stats(x)
    assert vae.latents_mean is None and vae.latents_std is None  # estimating changes nothing
    before = vae.encode(x).double()
    assert before.mean(dim=(0, 2, 3)).abs().max() > 1e-2  # this random model's channels are not centred
    vae.set_scaling(1.0, latents_mean=mean_c, latents_std=std_c)
    z = vae.encode(x).double()
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)


@torch.no_grad()
def test_channel_stats_round_trip(tmp_path):
    vae = DiffusersVAE(tiny_autoencoder_kl(), sample_posterior=False)
    vae.set_scaling(1.0, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["latents_mean"] == [0.1, 0.2, 0.3, 0.4] and config["latents_std"] == [1.0, 2.0, 3.0, 4.0]
    loaded = DiffusersVAE.from_pretrained(tmp_path / "vae", sample_posterior=False)
    assert loaded.latents_mean == (0.1, 0.2, 0.3, 0.4) and loaded.latents_std == (1.0, 2.0, 3.0, 4.0)
    torch.testing.assert_close(loaded.encode(images()), vae.encode(images()))
    # Without them a folder saves None, as diffusers' own configs do.
    DiffusersVAE(tiny_autoencoder_kl()).save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["latents_mean"] is None and config["latents_std"] is None


def test_channel_stats_reject_bad_values():
    vae = DiffusersVAE(tiny_autoencoder_kl())
    with pytest.raises(ValueError, match="latents_mean must be 4"):
        vae.set_scaling(1.0, latents_mean=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="latents_mean"):
        vae.set_scaling(1.0, latents_mean=[0.0, float("nan"), 0.0, 0.0])
    for bad in ([1.0, 1.0, 0.0, 1.0], [1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, float("inf")]):
        with pytest.raises(ValueError, match="latents_std must be 4 positive"):
            vae.set_scaling(1.0, latents_std=bad)
    assert vae.latents_std is None  # a refused call changes nothing


def test_zero_shift_saved_as_none(tmp_path):
    DiffusersVAE(tiny_autoencoder_kl(), scaling_factor=1.5).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (1.5, None)
    assert DiffusersVAE.from_pretrained(tmp_path).shift_factor == 0.0


@torch.no_grad()
def test_follows_module_dtype():
    vae = DiffusersVAE(tiny_autoencoder_kl()).double()
    z = vae.encode(images())  # float32 images go through the float64 model
    assert z.dtype == torch.float64
    assert vae.decode(z.float()).dtype == torch.float64


@pytest.mark.parametrize("shape", [(2, 3, 15, 16), (2, 3, 16, 9), (2, 1, 16, 16), (3, 16, 16)])
def test_bad_image_shapes_raise(shape):
    with pytest.raises(ValueError, match="images"):
        DiffusersVAE(tiny_autoencoder_kl()).encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (4, 8, 8)])
def test_bad_latent_shapes_raise(shape):
    with pytest.raises(ValueError, match="latents"):
        DiffusersVAE(tiny_autoencoder_kl()).decode(torch.zeros(shape))


def test_missing_local_folder_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in (tmp_path / "nope", "./nope", "nope", "a/b/c", "~/surely-not-here-vae"):
        with pytest.raises(FileNotFoundError, match="path_or_hub_id"):
            DiffusersVAE.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersVAE.from_pretrained(tmp_path / "empty")
    DiffusersVAE(tiny_autoencoder_kl()).save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="subfolder"):
        DiffusersVAE.from_pretrained(tmp_path / "model", subfolder="vae")


def test_hub_id_passed_through_to_diffusers(monkeypatch, tmp_path):
    calls = []

    def fake_from_pretrained(source, **kw):
        calls.append((source, kw))
        return tiny_autoencoder_kl()

    monkeypatch.chdir(tmp_path)  # so "owner/name" cannot exist as a local folder
    monkeypatch.setattr(diffusers_vae.AutoencoderKL, "from_pretrained", staticmethod(fake_from_pretrained))
    vae = DiffusersVAE.from_pretrained("stabilityai/sd-vae-ft-ema", subfolder="vae", torch_dtype=torch.float16)
    assert isinstance(vae, DiffusersVAE)
    source, kw = calls[0]
    assert source == "stabilityai/sd-vae-ft-ema"
    assert kw["subfolder"] == "vae" and kw["torch_dtype"] == torch.float16
