"""VARPipeline (VAR + tokenizer -> images) and flowar.registry.load_pipeline (the flowar-sample command for
both families is tested in test_pipeline_cli.py)."""

import json

import numpy as np
import pytest
import torch
from conftest import gen, tiny_flowar_pipeline, tiny_tokenizer, tiny_vae, tiny_var, tiny_var_pipeline
from PIL import Image

from flowar import FlowARPipeline, VARSampling
from flowar import load_pipeline as load_pipeline_from_flowar
from flowar.registry import load_pipeline
from flowar.var_pipeline import VARPipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


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
    indices = pipe([1, 2, 3], output_type="latent", generator=gen(), var_cfg=0.5, top_k=5)
    expected = pipe.model.sample([1, 2, 3], tokenizer=pipe.tokenizer, generator=gen(), var_cfg=0.5, top_k=5).indices
    assert [tuple(i.shape) for i in indices] == [(3, s, s) for s in (1, 2, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(indices, expected))
    # the images are the tokenizer's decoding of those tokens
    pt = pipe([1, 2, 3], output_type="pt", generator=gen(), var_cfg=0.5, top_k=5)
    decoded = (pipe.tokenizer.decode_indices(expected).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(pt, decoded, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpeg")


def test_sampling_options_three_ways_are_one():
    """A VARSampling, its fields as keywords, and VAR's own cfg (guidance_scale = 1 + var_cfg) give the same
    tokens; a FlowAR option is refused naming it."""
    pipe = tiny_var_pipeline()
    options = VARSampling(guidance_scale=2.5, top_k=5, top_p=0.9)
    a = pipe([1, 2], output_type="latent", generator=gen(2), sampling=options)
    b = pipe([1, 2], output_type="latent", generator=gen(2), guidance_scale=2.5, top_k=5, top_p=0.9)
    c = pipe([1, 2], output_type="latent", generator=gen(2), var_cfg=1.5, top_k=5, top_p=0.9)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    # the saved defaults (var-tiny: guidance 2.5) are what an empty call uses
    default = pipe([1, 2], output_type="latent", generator=gen(2))
    assert all(torch.equal(x, y) for x, y in zip(default, pipe([1, 2], output_type="latent", generator=gen(2),
                                                                  sampling=pipe.model.config.sampling)))
    with pytest.raises(ValueError, match="steps"):
        pipe([1], steps=3)
    with pytest.raises(ValueError, match="not both"):
        pipe([1], guidance_scale=2.0, var_cfg=1.0)


def test_save_and_load_round_trip_gives_identical_images(tmp_path):
    pipe = tiny_var_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "config.json").read_text())["model_type"] == "var"
    assert (tmp_path / "pipe" / "tokenizer" / "config.json").is_file()
    loaded = VARPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.model.config.sampling == pipe.model.config.sampling
    a = pipe([4, 5], output_type="np", generator=gen(1), var_cfg=1.5)
    b = loaded([4, 5], output_type="np", generator=gen(1), var_cfg=1.5)
    np.testing.assert_array_equal(a, b)
    other = tiny_var_pipeline(seed=1)  # a differently initialised pipeline does not (the test can fail)
    assert not np.array_equal(a, other([4, 5], output_type="np", generator=gen(1), var_cfg=1.5))
    # an explicit tokenizer object, or folder, replaces the saved one
    again = VARPipeline.from_pretrained(tmp_path / "pipe", tokenizer=tmp_path / "pipe" / "tokenizer")
    np.testing.assert_array_equal(a, again([4, 5], output_type="np", generator=gen(1), var_cfg=1.5))
    same = VARPipeline.from_pretrained(tmp_path / "pipe", autoencoder=pipe.tokenizer)
    np.testing.assert_array_equal(a, same([4, 5], output_type="np", generator=gen(1), var_cfg=1.5))
    with pytest.raises(ValueError, match="not both"):
        VARPipeline.from_pretrained(tmp_path / "pipe", autoencoder=pipe.tokenizer, tokenizer=pipe.tokenizer)


def test_missing_and_mismatched_tokenizers_are_refused(tmp_path):
    pipe = tiny_var_pipeline()
    pipe.model.save_pretrained(tmp_path / "model-only")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        VARPipeline.from_pretrained(tmp_path / "model-only")
    VARPipeline.from_pretrained(tmp_path / "model-only", tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="tokenizer does not match"):
        VARPipeline(pipe.model, tiny_tokenizer(codebook_size=16))


def test_unconditional_pipeline_takes_batch_size():
    pipe = VARPipeline(tiny_var(0, sharpen=False, depth=1, width=32, num_heads=2, num_classes=0), tiny_tokenizer())
    assert pipe(batch_size=2, output_type="np").shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([1], output_type="np")


def test_load_pipeline_dispatches_on_the_model_type(tmp_path):
    tiny_var_pipeline().save_pretrained(tmp_path / "var")
    tiny_flowar_pipeline().save_pretrained(tmp_path / "flowar")
    assert isinstance(load_pipeline(tmp_path / "var"), VARPipeline)
    assert isinstance(load_pipeline(tmp_path / "flowar"), FlowARPipeline)
    assert load_pipeline_from_flowar is load_pipeline  # ``from flowar import load_pipeline`` still works
    # a folder's config.json must say its model_type: nothing is guessed
    config_file = tmp_path / "flowar" / "config.json"
    config = json.loads(config_file.read_text())
    del config["model_type"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no model_type"):
        load_pipeline(tmp_path / "flowar")
    config_file.write_text(json.dumps({**config, "model_type": "dit"}))
    with pytest.raises(ValueError, match="'dit'"):
        load_pipeline(tmp_path / "flowar")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pipeline(tmp_path / "nowhere")
    # the autoencoder that replaces the folder's own is autoencoder= for both families; a FlowAR VAE is no
    # tokenizer for a VAR folder, as an object or as a folder
    var_folder = load_pipeline(tmp_path / "var", autoencoder=tmp_path / "var" / "tokenizer")
    assert isinstance(var_folder, VARPipeline)
    with pytest.raises(ValueError, match="tokenizer does not match"):
        load_pipeline(tmp_path / "var", autoencoder=tiny_vae())
    with pytest.raises((ValueError, FileNotFoundError), match="vae"):
        load_pipeline(tmp_path / "var", autoencoder=tmp_path / "flowar" / "vae")
    with pytest.raises(TypeError, match="vae"):
        load_pipeline(tmp_path / "var", vae=tmp_path / "flowar" / "vae")
    with pytest.raises(TypeError, match="vae"):
        VARPipeline.from_pretrained(tmp_path / "var", vae=tmp_path / "flowar" / "vae")
