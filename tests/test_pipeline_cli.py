"""FlowARPipeline (model + VAE -> images) and the ``flowar-sample`` command, which samples FlowAR and VAR
folders and released checkpoints alike and refuses options of the other family by name."""

import numpy as np
import pytest
import torch
from conftest import gen, tiny_flowar_pipeline, tiny_var_pipeline, tiny_vae
from PIL import Image

from flowar import (FlexVAR, FlexVARPipeline, FlowARPipeline, FlowARSampling, VAR, VARPipeline, get_flexvar_preset,
                    get_var_preset)
from flowar.cli import main as cli_main
from flowar.outputs import image_grid
from vae.flexvq import FlexVQVAE, get_flexvq_preset
from vae.msvq import MultiScaleVQVAE, get_msvq_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def read_grid(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved FlowAR pipeline folder and a saved VAR pipeline folder (the pipelines of conftest)."""
    root = tmp_path_factory.mktemp("pipelines")
    tiny_flowar_pipeline().save_pretrained(root / "flowar")
    tiny_var_pipeline().save_pretrained(root / "var")
    return root / "flowar", root / "var"


# ---------------------------------------------------------------------------------------------- pipeline
def test_output_types_shapes_and_ranges():
    pipe = tiny_flowar_pipeline()
    kwargs = dict(steps=2, guidance_scale=2.0)
    pt = pipe([1, 2, 3], output_type="pt", generator=gen(0), **kwargs)
    assert pt.shape == (3, 3, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    arr = pipe([1, 2, 3], output_type="np", generator=gen(0), **kwargs)
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    # the same generator gives the same images; uint8 is the rounded float image
    np.testing.assert_allclose(arr.astype(np.float32), (pt.permute(0, 2, 3, 1).numpy() * 255), atol=0.51)
    pil = pipe([1], output_type="pil", **kwargs)
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    latents = pipe([1], output_type="latent", **kwargs)
    assert latents.shape == (1, 4, 8, 8)
    # "latent" is exactly what FlowAR.sample draws with the same generator; keywords update the saved defaults
    # (flowar-tiny's guidance interval (0, 0.9) included), a FlowARSampling replaces them
    latents = pipe([1, 2], output_type="latent", generator=gen(4), **kwargs)
    assert torch.equal(latents, pipe.model.sample([1, 2], generator=gen(4), **kwargs))
    typed = pipe([1, 2], output_type="latent", generator=gen(4), sampling=pipe.model.config.sampling.replace(**kwargs))
    assert torch.equal(latents, typed)
    whole = pipe([1, 2], output_type="latent", generator=gen(4), sampling=FlowARSampling(**kwargs))
    assert torch.equal(whole, pipe([1, 2], output_type="latent", generator=gen(4), guidance_interval=(0.0, 1.0),
                                   **kwargs))
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpeg")
    with pytest.raises(ValueError, match="top_k"):  # a VAR option
        pipe([1], top_k=5)


def test_pipeline_save_and_load_round_trip(tmp_path):
    pipe = tiny_flowar_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae" / "config.json").is_file()
    loaded = FlowARPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.model.config.sampling == pipe.model.config.sampling
    a = pipe([4, 5], output_type="np", steps=2, generator=gen(1))
    b = loaded([4, 5], output_type="np", steps=2, generator=gen(1))
    np.testing.assert_array_equal(a, b)
    for named in (dict(vae=pipe.vae), dict(autoencoder=pipe.vae), dict(vae=tmp_path / "pipe" / "vae")):
        again = FlowARPipeline.from_pretrained(tmp_path / "pipe", **named)
        np.testing.assert_array_equal(a, again([4, 5], output_type="np", steps=2, generator=gen(1)))


def test_image_grid_layout():
    tiles = np.stack([np.full((4, 4, 3), v, dtype=np.uint8) for v in (10, 20, 30)])
    grid = np.asarray(image_grid(tiles, nrow=2, pad=1))
    assert grid.shape == (11, 11, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 6, 0] == 20 and grid[6, 1, 0] == 30 and grid[6, 6, 0] == 255


# ---------------------------------------------------------------------------------------------- CLI: FlowAR
def test_cli_samples_a_flowar_folder(folders, tmp_path, capsys):
    flowar_dir, _ = folders
    out = tmp_path / "grid.png"
    code = cli_main([str(flowar_dir), "--labels", "1,2,3", "--num-images", "2", "--guidance-scale", "2",
                     "--steps", "2", "--solver", "midpoint", "--seed", "5", "--out", str(out), "--nrow", "3",
                     "--device", "cpu"])
    assert code == 0 and "wrote 6 images" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 16 px tiles with 2 px padding
    pipe = FlowARPipeline.from_pretrained(flowar_dir)
    expected = pipe([1, 1, 2, 2, 3, 3], output_type="np", guidance_scale=2.0, steps=2, solver="midpoint",
                    generator=gen(5))
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 3)))


def test_per_scale_steps_given_with_slashes_sample_as_with_commas(folders, tmp_path):
    """Step and jump counts are written "2,3,4,5" (flowar-sample) or "2/3/4/5" (train.distill_head, the demo's
    --distill): both mean one count per scale, and give the same images."""
    flowar_dir, _ = folders
    grids = []
    for steps in ("2,3,4,5", "2/3/4/5"):
        out = tmp_path / f"{steps.count('/')}.png"
        assert cli_main([str(flowar_dir), "--labels", "1,2", "--steps", steps, "--seed", "3", "--out", str(out),
                         "--device", "cpu"]) == 0
        grids.append(read_grid(out))
    pipe = FlowARPipeline.from_pretrained(flowar_dir)
    expected = pipe([1, 2], output_type="np", steps=[2, 3, 4, 5], generator=gen(3))
    np.testing.assert_array_equal(grids[0], np.asarray(image_grid(expected, 2)))
    np.testing.assert_array_equal(grids[1], grids[0])


def test_cli_reports_bad_input_naming_the_argument(folders, tmp_path, capsys):
    flowar_dir, _ = folders
    assert cli_main([str(flowar_dir), "--labels", "3,12", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    assert "class_labels must lie in [0, 9]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([str(flowar_dir), "--solver", "heun"])
    assert cli_main([str(flowar_dir), "--steps", "0", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the old flag is gone
        cli_main([str(flowar_dir), "--cfg", "2"])
    assert "--cfg" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "nowhere")]) == 2
    assert "path" in capsys.readouterr().err
    weights = tmp_path / "FlowAR-S.pth"
    torch.save({}, weights)
    assert cli_main([str(weights)]) == 2
    assert "--preset is required" in capsys.readouterr().err


# Each family's own options, refused on the other family's folder (flowar = 0, var = 1 in ``folders``).
OTHER_FAMILY_OPTIONS = [(0, ["--top-k", "5"]), (0, ["--top-p", "0.9"]), (0, ["--temperature", "0.5"]),
                        (0, ["--more-smooth"]), (0, ["--var-cfg", "1.5"]),
                        (1, ["--steps", "3"]), (1, ["--solver", "midpoint"]), (1, ["--schedule", "uniform"]),
                        (1, ["--guidance-interval", "0,0.5"]), (1, ["--atol", "1e-3"]), (1, ["--rtol", "1e-3"]),
                        (1, ["--scales", "1,2,4"])]


@pytest.mark.parametrize("folder, option", OTHER_FAMILY_OPTIONS)
def test_cli_refuses_options_of_the_other_family(folders, tmp_path, capsys, folder, option):
    out = tmp_path / "grid.png"
    assert cli_main([str(folders[folder]), "--labels", "1", "--out", str(out), "--device", "cpu", *option]) == 2
    assert option[0] in capsys.readouterr().err and not out.exists()  # the flag is named


def test_cli_refuses_a_tokenizer_on_a_flowar_folder(folders, tmp_path, capsys):
    flowar_dir, var_dir = folders
    out = tmp_path / "grid.png"
    assert cli_main([str(flowar_dir), "--tokenizer", str(var_dir / "tokenizer"), "--out", str(out)]) == 2
    assert "--tokenizer" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------- CLI: VAR
def test_cli_samples_a_var_folder(folders, tmp_path, capsys):
    _, var_dir = folders
    out = tmp_path / "grid.png"
    args = [str(var_dir), "--labels", "1,2", "--num-images", "2", "--var-cfg", "1.0", "--top-k", "4",
            "--seed", "3", "--nrow", "2", "--out", str(out), "--device", "cpu"]
    assert cli_main(args) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    pipe = VARPipeline.from_pretrained(var_dir)
    expected = pipe([1, 1, 2, 2], output_type="np", var_cfg=1.0, top_k=4, generator=gen(3))
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 2)))
    # --more-smooth reaches the sampler
    assert cli_main([*args, "--more-smooth"]) == 0
    smooth = pipe([1, 1, 2, 2], output_type="np", var_cfg=1.0, top_k=4, more_smooth=True, generator=gen(3))
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(smooth, 2)))
    assert not np.array_equal(smooth, expected)


def test_cli_var_cfg_is_guidance_scale_plus_one(folders, tmp_path):
    _, var_dir = folders
    common = [str(var_dir), "--labels", "1,2,3", "--top-k", "6", "--seed", "1", "--device", "cpu"]
    assert cli_main([*common, "--var-cfg", "1.5", "--out", str(tmp_path / "var_cfg.png")]) == 0
    assert cli_main([*common, "--guidance-scale", "2.5", "--out", str(tmp_path / "scale.png")]) == 0
    assert cli_main([*common, "--guidance-scale", "1", "--out", str(tmp_path / "unguided.png")]) == 0
    by_var_cfg, by_scale = read_grid(tmp_path / "var_cfg.png"), read_grid(tmp_path / "scale.png")
    np.testing.assert_array_equal(by_var_cfg, by_scale)
    assert not np.array_equal(by_scale, read_grid(tmp_path / "unguided.png"))  # guidance changes the grid


def test_cli_refuses_a_vae_on_a_var_folder(folders, tmp_path, capsys):
    flowar_dir, var_dir = folders
    out = tmp_path / "grid.png"
    assert cli_main([str(var_dir), "--vae", str(flowar_dir / "vae"), "--labels", "1", "--out", str(out)]) == 2
    assert "--vae" in capsys.readouterr().err and not out.exists()


def test_cli_samples_released_style_var_checkpoints(tmp_path, capsys):
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
    assert cli_main(args) == 0
    # no sampling options: the preset's saved defaults (var-tiny: guidance 2.5)
    expected = VARPipeline(model, tokenizer)([3, 4], output_type="np", generator=gen(0))
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 2)))
    # the released command line needs both --preset and --tokenizer
    assert cli_main([str(tmp_path / "var_tiny.pth"), "--out", str(out)]) == 2
    assert "--preset is required" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "var_tiny.pth"), "--preset", "var-tiny", "--out", str(out)]) == 2
    assert "--tokenizer is required" in capsys.readouterr().err
    # a FlowAR VAE with a VAR preset is refused naming it
    assert cli_main([str(tmp_path / "var_tiny.pth"), "--preset", "var-tiny", "--vae", "kl16.ckpt", "--out",
                     str(out)]) == 2
    assert "--vae" in capsys.readouterr().err
    # a tokenizer of another architecture fails cleanly, naming the keys
    assert cli_main([str(tmp_path / "var_tiny.pth"), "--preset", "var-tiny", "--tokenizer",
                     str(tmp_path / "vae_mnist.pth"), "--tokenizer-preset", "tiny", "--out", str(out)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_cli_samples_a_flow_map_release_at_its_saved_jumps_and_refuses_jumps_for_an_ordinary_head(folders, tmp_path,
                                                                                                   capsys):
    """A flow-map release samples with its saved defaults (here 2 uniform jumps per scale, unguided), and --steps
    sets its jumps per scale; an ordinary head asked for flow-map jumps exits naming the solver."""
    student = tiny_flowar_pipeline(flow_map=True, sampling={"solver": "flow-map", "steps": 2, "schedule": "uniform",
                                                            "guidance_scale": 1.0})
    with torch.no_grad():  # a head whose jumps move the sample (the released init zeroes its output)
        student.model.flownet.final_layer.linear.weight.normal_(std=0.3, generator=gen(1))
    student.save_pretrained(tmp_path / "student")
    for steps in ("2", "1"):
        out = tmp_path / f"jumps-{steps}.png"
        argv = [str(tmp_path / "student"), "--labels", "1,2", "--seed", "3", "--out", str(out), "--nrow", "2",
                "--device", "cpu"] + (["--steps", steps] if steps == "1" else [])
        assert cli_main(argv) == 0
        expected = student([1, 2], output_type="np", generator=gen(3), steps=int(steps))
        np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 2)))
    assert not np.array_equal(read_grid(tmp_path / "jumps-2.png"), read_grid(tmp_path / "jumps-1.png"))
    flowar_dir, _ = folders
    capsys.readouterr()
    assert cli_main([str(flowar_dir), "--solver", "flow-map", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    assert "flow-map" in capsys.readouterr().err


def test_cli_samples_a_flexible_model_at_a_larger_list_and_refuses_it_for_a_fixed_one(folders, tmp_path, capsys):
    tiny_flowar_pipeline(positions="grid", scale_lists="random").save_pretrained(tmp_path / "flexible")
    out = tmp_path / "large.png"
    assert cli_main([str(tmp_path / "flexible"), "--labels", "1", "--scales", "1,2,4,8,12", "--steps", "2",
                     "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (24 + 4, 24 + 4)  # 12 latent pixels, 2x upsampling VAE, 2 px padding
    assert cli_main([str(folders[0]), "--labels", "1", "--scales", "1,3,8", "--out", str(tmp_path / "no.png"),
                     "--device", "cpu"]) == 2
    assert "positions='grid'" in capsys.readouterr().err


def test_cli_samples_a_flexible_model_at_a_wide_grid_and_refuses_a_misspelt_one(folders, tmp_path, capsys):
    tiny_flowar_pipeline(positions="grid", scale_lists="random").save_pretrained(tmp_path / "flexible")
    out = tmp_path / "wide.png"
    assert cli_main([str(tmp_path / "flexible"), "--labels", "1", "--scales", "1,2,4,8x12", "--steps", "2",
                     "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (24 + 4, 16 + 4)  # 8 x 12 latent pixels, 2x upsampling VAE, 2 px padding
    with pytest.raises(SystemExit):
        cli_main([str(tmp_path / "flexible"), "--scales", "1,2,4,8x", "--out", str(tmp_path / "no.png")])
    assert "--scales must be comma-separated sides, a grid that is not square as HEIGHTxWIDTH" in capsys.readouterr().err


def test_cli_samples_flexvar_at_other_scale_lists_from_a_folder_and_released_files(tmp_path, capsys):
    """A saved FlexVAR folder at its own list and at a larger last side; the released file pair (model .pth with
    --preset, FlexVAE.pth-style tokenizer with the authors' keys); options it does not have are refused."""
    torch.manual_seed(0)
    model = FlexVAR(get_flexvar_preset("flexvar-tiny")).eval()
    tokenizer = FlexVQVAE(get_flexvq_preset("mnist")).eval()
    FlexVARPipeline(model, tokenizer).save_pretrained(tmp_path / "flexvar")
    out = tmp_path / "grid.png"
    common = ["--labels", "3,4", "--device", "cpu", "--out", str(out)]
    assert cli_main([str(tmp_path / "flexvar"), *common, "--scales", "1,2,4,8,12", "--top-k", "5"]) == 0
    expected = FlexVARPipeline(model, tokenizer)([3, 4], output_type="np", generator=gen(0), scales=(1, 2, 4, 8, 12),
                                                 top_k=5)
    assert expected.shape == (2, 48, 48, 3)
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 2)))
    state = {**model.state_dict(), "attn_bias_for_masking": torch.zeros(1, 1, 85, 85),
             **{f"blocks.{i}.attn.zero_k_bias": torch.zeros(128) for i in range(4)}}
    torch.save(state, tmp_path / "flexvar_tiny.pth")
    torch.save({"model": {**tokenizer.state_dict(), "quantize.codebook_used": torch.zeros(65536)}},
               tmp_path / "flexvae_mnist.pth")
    released = [str(tmp_path / "flexvar_tiny.pth"), "--preset", "flexvar-tiny", "--tokenizer",
                str(tmp_path / "flexvae_mnist.pth"), "--tokenizer-preset", "mnist", *common]
    assert cli_main(released) == 0
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(
        FlexVARPipeline(model, tokenizer)([3, 4], output_type="np", generator=gen(0)), 2)))
    for bad, name in ((["--steps", "3"], "--steps"), (["--scales", "1,2,40"], "max_side"),
                      (["--tokenizer-preset", "vae_ch160v4096z32"], "--tokenizer-preset")):
        assert cli_main([str(tmp_path / "flexvar"), *common, *bad]) == 2
        assert name in capsys.readouterr().err


def test_cli_takes_a_step_count_per_scale_and_xar_s_solvers(folders, tmp_path, capsys):
    """--steps 3,2,2,4 samples as the pipeline does with steps=(3, 2, 2, 4); an xAR release takes its sde
    solver and a count per cell; a count list of the wrong length is refused naming steps."""
    from flowar import XAR, XARPipeline, get_xar_preset

    flowar_dir, _ = folders
    out = tmp_path / "per-scale.png"
    assert cli_main([str(flowar_dir), "--labels", "4", "--steps", "3,2,2,4", "--seed", "2", "--out", str(out),
                     "--device", "cpu"]) == 0
    pipe = FlowARPipeline.from_pretrained(flowar_dir)
    expected = pipe([4], output_type="np", steps=(3, 2, 2, 4), generator=gen(2))
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 1)))
    assert cli_main([str(flowar_dir), "--labels", "4", "--steps", "3,2", "--out", str(tmp_path / "no.png"),
                     "--device", "cpu"]) == 2
    assert "steps" in capsys.readouterr().err

    torch.manual_seed(0)
    XARPipeline(XAR(get_xar_preset("xar-tiny")).eval(), tiny_vae(0)).save_pretrained(tmp_path / "xar")
    out = tmp_path / "xar.png"
    assert cli_main([str(tmp_path / "xar"), "--labels", "1", "--solver", "sde", "--steps", "3,2,2,4", "--seed", "1",
                     "--out", str(out), "--device", "cpu"]) == 0
    xar_pipe = XARPipeline.from_pretrained(tmp_path / "xar")
    expected = xar_pipe([1], output_type="np", solver="sde", steps=(3, 2, 2, 4), generator=gen(1))
    np.testing.assert_array_equal(read_grid(out), np.asarray(image_grid(expected, 1)))
