"""VARPipeline (VAR + tokenizer -> images), flowar.pipelines.load_pipeline, and flowar-sample for VAR."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from flowar import FlowAR, FlowARPipeline, get_preset
from flowar.pipeline import image_grid
from flowar.pipelines import load_pipeline
from flowar.var import VAR
from flowar.cli import main as flowar_sample
from flowar.var_cli import is_var_invocation
from flowar.var_config import get_var_preset
from flowar.var_pipeline import VARPipeline
from vae import DiffusersVAE
from vae.msvq import MultiScaleVQVAE, get_msvq_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_var_pipeline(seed=0) -> VARPipeline:
    """A random VAR (2 blocks, width 64) on msvq's "tiny" tokenizer: scales 1..4, 8x8 images."""
    torch.manual_seed(seed)
    config = get_var_preset("var-tiny", scales=(1, 2, 3, 4), vocab_size=32, code_dim=8, depth=2, width=64,
                            num_heads=4)
    model = VAR(config)
    with torch.no_grad():  # sharpen the head so that the draws depend on the weights
        model.head.weight.normal_(std=0.3)
    return VARPipeline(model, MultiScaleVQVAE(get_msvq_preset("tiny")))


def test_output_types_shapes_and_ranges():
    pipe = tiny_var_pipeline()
    assert not pipe.model.training and not pipe.tokenizer.training
    pt = pipe([1, 2, 3], output_type="pt", generator=gen())
    assert pt.shape == (3, 3, 8, 8) and pt.dtype == torch.float32 and pt.min() >= 0 and pt.max() <= 1
    arr = pipe([1, 2, 3], output_type="np", generator=gen())
    assert arr.shape == (3, 8, 8, 3) and arr.dtype == np.uint8
    np.testing.assert_allclose(arr.astype(np.float32), pt.permute(0, 2, 3, 1).numpy() * 255, atol=0.51)
    pil = pipe([4], output_type="pil", generator=gen())
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    # "latent" is the token maps, exactly what VAR.sample draws with the same generator
    indices = pipe([1, 2, 3], output_type="latent", generator=gen(), cfg=0.5, top_k=5)
    expected = pipe.model.sample([1, 2, 3], tokenizer=pipe.tokenizer, generator=gen(), cfg=0.5, top_k=5).indices
    assert [tuple(i.shape) for i in indices] == [(3, s, s) for s in (1, 2, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(indices, expected))
    # the images are the tokenizer's decoding of those tokens
    pt = pipe([1, 2, 3], output_type="pt", generator=gen(), cfg=0.5, top_k=5)
    decoded = (pipe.tokenizer.decode_indices(expected).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(pt, decoded, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpeg")


def test_save_and_load_round_trip_gives_identical_images(tmp_path):
    pipe = tiny_var_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "config.json").read_text())["model_type"] == "var"
    assert (tmp_path / "pipe" / "tokenizer" / "config.json").is_file()
    loaded = VARPipeline.from_pretrained(tmp_path / "pipe")
    a = pipe([4, 5], output_type="np", generator=gen(1), cfg=1.5)
    b = loaded([4, 5], output_type="np", generator=gen(1), cfg=1.5)
    np.testing.assert_array_equal(a, b)
    other = tiny_var_pipeline(seed=1)  # a differently initialised pipeline does not (the test can fail)
    assert not np.array_equal(a, other([4, 5], output_type="np", generator=gen(1), cfg=1.5))
    # an explicit tokenizer object, or folder, replaces the saved one
    again = VARPipeline.from_pretrained(tmp_path / "pipe", tokenizer=tmp_path / "pipe" / "tokenizer")
    np.testing.assert_array_equal(a, again([4, 5], output_type="np", generator=gen(1), cfg=1.5))


def test_missing_and_mismatched_tokenizers_are_refused(tmp_path):
    pipe = tiny_var_pipeline()
    pipe.model.save_pretrained(tmp_path / "model-only")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        VARPipeline.from_pretrained(tmp_path / "model-only")
    VARPipeline.from_pretrained(tmp_path / "model-only", tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="tokenizer does not match"):
        VARPipeline(pipe.model, MultiScaleVQVAE(get_msvq_preset("tiny", codebook_size=16)))


def test_unconditional_pipeline_takes_batch_size():
    torch.manual_seed(0)
    config = get_var_preset("var-tiny", scales=(1, 2, 3, 4), vocab_size=32, code_dim=8, depth=1, width=32,
                            num_heads=2, num_classes=0)
    pipe = VARPipeline(VAR(config), MultiScaleVQVAE(get_msvq_preset("tiny")))
    assert pipe(batch_size=2, output_type="np").shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([1], output_type="np")


def tiny_flowar_pipeline() -> FlowARPipeline:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=16, scaling_factor=0.5,
    )
    return FlowARPipeline(FlowAR(get_preset("flowar-tiny")).eval(), DiffusersVAE(autoencoder).eval())


def test_load_pipeline_dispatches_on_the_model_type(tmp_path):
    tiny_var_pipeline().save_pretrained(tmp_path / "var")
    tiny_flowar_pipeline().save_pretrained(tmp_path / "flowar")
    assert isinstance(load_pipeline(tmp_path / "var"), VARPipeline)
    assert isinstance(load_pipeline(tmp_path / "flowar"), FlowARPipeline)
    # folders from before the key existed are FlowAR, as FlowAR.from_pretrained reads them
    config_file = tmp_path / "flowar" / "config.json"
    config = json.loads(config_file.read_text())
    del config["model_type"]
    config_file.write_text(json.dumps(config))
    assert isinstance(load_pipeline(tmp_path / "flowar"), FlowARPipeline)
    config_file.write_text(json.dumps({**config, "model_type": "dit"}))
    with pytest.raises(ValueError, match="'dit'"):
        load_pipeline(tmp_path / "flowar")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="vae is for FlowAR"):
        load_pipeline(tmp_path / "var", vae=tmp_path / "flowar" / "vae")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_samples_a_var_folder(tmp_path, capsys):
    pipe = tiny_var_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    args = [str(tmp_path / "pipe"), "--labels", "1,2", "--num-images", "2", "--cfg", "1.0", "--top-k", "4",
            "--seed", "3", "--nrow", "2", "--out", str(out), "--device", "cpu"]
    assert is_var_invocation(args)
    assert flowar_sample(args) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    expected = pipe([1, 1, 2, 2], output_type="np", cfg=1.0, top_k=4, generator=gen(3))
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(image_grid(expected, 2)))


def test_cli_samples_released_style_checkpoints(tmp_path, capsys):
    """A var_dXX.pth-style bare state dict with --preset, and a tokenizer .pth with the authors' key names
    (here var-tiny with msvq's "mnist" architecture; the default --tokenizer-preset is the release's)."""
    torch.manual_seed(0)
    model = VAR(get_var_preset("var-tiny")).eval()
    tokenizer = MultiScaleVQVAE(get_msvq_preset("mnist")).eval()
    torch.save(model.state_dict(), tmp_path / "var_tiny.pth")
    torch.save(tokenizer.state_dict(), tmp_path / "vae_mnist.pth")
    out = tmp_path / "grid.png"
    args = [str(tmp_path / "var_tiny.pth"), "--preset", "var-tiny", "--tokenizer", str(tmp_path / "vae_mnist.pth"),
            "--tokenizer-preset", "mnist", "--labels", "3,4", "--out", str(out), "--device", "cpu"]
    assert is_var_invocation(args)
    assert flowar_sample(args) == 0
    expected = VARPipeline(model, tokenizer)([3, 4], output_type="np", generator=gen(0))
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(image_grid(expected, 2)))
    # the released command line needs both --preset and --tokenizer
    assert flowar_sample([str(tmp_path / "var_tiny.pth"), "--out", str(out)]) == 2
    assert "--preset is required" in capsys.readouterr().err
    assert flowar_sample([str(tmp_path / "var_tiny.pth"), "--preset", "var-tiny", "--out", str(out)]) == 2
    assert "--tokenizer is required" in capsys.readouterr().err
    # a tokenizer of another architecture fails cleanly, naming the keys
    assert flowar_sample([str(tmp_path / "var_tiny.pth"), "--preset", "var-tiny", "--tokenizer",
                         str(tmp_path / "vae_mnist.pth"), "--tokenizer-preset", "tiny", "--out", str(out)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_flowar_command_lines_are_not_taken_for_var(tmp_path):
    tiny_flowar_pipeline().save_pretrained(tmp_path / "flowar")
    assert not is_var_invocation([str(tmp_path / "flowar"), "--labels", "1"])
    assert not is_var_invocation(["FlowAR-S.pth", "--preset", "flowar-s", "--vae", "kl16.ckpt"])
    assert is_var_invocation(["var_d16.pth", "--preset", "var-d16", "--tokenizer", "vae_ch160v4096z32.pth"])
    assert not is_var_invocation([str(tmp_path / "missing")])
    out = tmp_path / "grid.png"
    assert flowar_sample([str(tmp_path / "flowar"), "--labels", "1", "--steps", "2", "--out", str(out),
                     "--device", "cpu"]) == 0
    assert Image.open(out).size[1] == 16 + 4
