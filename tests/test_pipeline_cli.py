"""FlowARPipeline (model + VAE -> images) and the flowar-sample command."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from flowar import FlowAR, FlowARPipeline, get_preset
from flowar.cli import main as cli_main
from flowar.pipeline import image_grid
from vae import DiffusersVAE


def tiny_pipeline() -> FlowARPipeline:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=16, scaling_factor=0.5,
    )
    model = FlowAR(get_preset("flowar-tiny")).eval()  # 8x8 latents of 4 channels -> 16x16 images
    return FlowARPipeline(model, DiffusersVAE(autoencoder).eval())


def test_output_types_shapes_and_ranges():
    pipe = tiny_pipeline()
    kwargs = dict(steps=2, cfg=2.0)
    pt = pipe([1, 2, 3], output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs)
    assert pt.shape == (3, 3, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    arr = pipe([1, 2, 3], output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    # the same generator gives the same images; uint8 is the rounded float image
    np.testing.assert_allclose(arr.astype(np.float32), (pt.permute(0, 2, 3, 1).numpy() * 255), atol=0.51)
    pil = pipe([1], output_type="pil", **kwargs)
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    latents = pipe([1], output_type="latent", **kwargs)
    assert latents.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpeg")


def test_pipeline_save_and_load_round_trip(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae" / "config.json").is_file()
    loaded = FlowARPipeline.from_pretrained(tmp_path / "pipe")
    a = pipe([4, 5], output_type="np", steps=2, generator=torch.Generator().manual_seed(1))
    b = loaded([4, 5], output_type="np", steps=2, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a, b)


def test_cli_writes_a_grid(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    code = cli_main([str(tmp_path / "pipe"), "--labels", "1,2,3", "--num-images", "2", "--cfg", "2",
                     "--steps", "2", "--solver", "midpoint", "--out", str(out), "--nrow", "3"])
    assert code == 0 and "wrote 6 images" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 16 px tiles with 2 px padding


def test_cli_reports_bad_input_naming_the_argument(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    assert cli_main([str(tmp_path / "pipe"), "--labels", "3,12", "--out", str(tmp_path / "g.png")]) == 2
    assert "class_labels must lie in [0, 9]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([str(tmp_path / "pipe"), "--solver", "heun"])
    assert cli_main([str(tmp_path / "nowhere")]) == 2
    assert "path" in capsys.readouterr().err
    weights = tmp_path / "FlowAR-S.pth"
    torch.save({}, weights)
    assert cli_main([str(weights)]) == 2
    assert "--preset is required" in capsys.readouterr().err


def test_image_grid_layout():
    tiles = np.stack([np.full((4, 4, 3), v, dtype=np.uint8) for v in (10, 20, 30)])
    grid = np.asarray(image_grid(tiles, nrow=2, pad=1))
    assert grid.shape == (11, 11, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 6, 0] == 20 and grid[6, 1, 0] == 30 and grid[6, 6, 0] == 255
