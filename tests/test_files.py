"""vae.files, the one file layer: corrupt weights and configs are errors naming the file, pickled code never
runs, configs round-trip through JSON, old config.json files still load, and model_type picks the class."""

import json
import random

import pytest
import torch

from flowar import VAR, XAR, FlexVAR, FlowAR, get_flexvar_preset, get_preset, get_var_preset, get_xar_preset
from flowar.config import FlowARConfig, FlowARSampling
from flowar.registry import MODEL_CLASSES, load_model, model_type, pipeline_class
from flowar.var_config import VARConfig, VARSampling
from vae.files import atomic_write, read_config, read_torch_state_dict
from vae.flexvq import FlexVQVAE, get_flexvq_preset
from vae.msvq import MultiScaleVQConfig, MultiScaleVQVAE, get_msvq_preset


def tiny_models():
    """One random model of each saved type (FlowAR, VAR, FlexVAR, xAR and the two VQ tokenizers)."""
    torch.manual_seed(0)
    return {
        "flowar": FlowAR(get_preset("flowar-tiny", scales=(1, 2, 4))),
        "var": VAR(get_var_preset("var-tiny", depth=1, width=64, num_heads=4)),
        "flexvar": FlexVAR(get_flexvar_preset("flexvar-tiny", depth=1, width=64, num_heads=4)),
        "xar": XAR(get_xar_preset("xar-tiny")),
        "tokenizer": MultiScaleVQVAE(get_msvq_preset("tiny")),
        "flexvq": FlexVQVAE(get_flexvq_preset("mnist")),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model of :func:`tiny_models` saved in its own folder: {name: (model, folder)}."""
    root = tmp_path_factory.mktemp("saved")
    return {name: (model, model.save_pretrained(root / name)) for name, model in tiny_models().items()}


def copy_folder(folder, to):
    to.mkdir()
    for name in ("config.json", "model.safetensors"):
        (to / name).write_bytes((folder / name).read_bytes())
    return to


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", ["flowar", "var", "tokenizer"])
@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["half", "header-only"])
def test_truncated_safetensors_is_an_error_naming_the_file(saved, tmp_path, name, keep):
    model, folder = saved[name]
    broken = copy_folder(folder, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep), 1)])
    with pytest.raises(ValueError, match=f"{weights}.*truncated or corrupt"):
        type(model).from_pretrained(broken)
    with pytest.raises(ValueError, match=str(weights)):
        load_model(broken)


def test_intact_folders_load_back_the_same_weights(saved):
    for model, folder in saved.values():
        loaded = type(model).from_pretrained(folder)
        assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
        assert same_weights(loaded, model)


@pytest.fixture
def released(tmp_path):
    """A FlowAR state dict in the released layout (a bare dict of tensors) saved as a .pth."""
    torch.manual_seed(1)
    model = FlowAR(get_preset("flowar-tiny"))
    path = tmp_path / "FlowAR-T.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_released_pth_loads(released):
    model, path = released
    assert same_weights(FlowAR.from_released(path, "flowar-tiny"), model)


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_pth_is_an_error_naming_the_file(released, keep):
    _, path = released
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{path} is not a readable PyTorch checkpoint"):
        FlowAR.from_released(path, "flowar-tiny")


# A file that is not a checkpoint at all is corrupt, not "Python objects": today random bytes are reported as
# pickled objects (torch's weights-only unpickler raises UnpicklingError for any bad opcode) and a text file
# escapes as a bare KeyError. Proposed fix (vae/files.py, read_torch_state_dict): report UnpicklingError as
# "Python objects" only when torch names a global it refused ("global" in the message), as "not a readable
# PyTorch checkpoint" otherwise, and add KeyError / IndexError / UnicodeDecodeError to the corrupt-file catch.


@pytest.mark.parametrize("content", [
    pytest.param(random.Random(0).randbytes(4096), id="random-bytes"),
    pytest.param(b"hello, this is not a checkpoint\n" * 20, id="text"),
    pytest.param(b"PK\x03\x04" + bytes(200), id="zip-magic-then-zeros"),
])
def test_garbage_pth_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path} is not a readable PyTorch checkpoint"):
        FlowAR.from_released(path, "flowar-tiny")


class RunsCodeWhenUnpickled:
    """Unpickling this calls open(marker, "w"): a file appears if the loader ever runs pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match=f"{path} holds Python objects"):
        FlowAR.from_released(path, "flowar-tiny")
    with pytest.raises(ValueError, match="holds Python objects"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_state_dict_wrappers_and_non_tensor_contents(tmp_path):
    state = {"a": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"model_ema": state, "model": {"a": torch.zeros(2)}, "epoch": 3}, tmp_path / "ema.pth")
    got = read_torch_state_dict(tmp_path / "ema.pth")  # the first wrapper present wins: model_ema
    assert got.keys() == state.keys() and torch.equal(got["a"], state["a"])
    torch.save({"state_dict": state}, tmp_path / "sd.pth")
    assert torch.equal(read_torch_state_dict(tmp_path / "sd.pth", wrappers=("model", "state_dict"))["a"], state["a"])
    torch.save({"a": 1, "b": [2]}, tmp_path / "numbers.pth")
    with pytest.raises(ValueError, match="numbers.pth does not hold a state dict of tensors"):
        read_torch_state_dict(tmp_path / "numbers.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        read_torch_state_dict(tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("text", ["{not json", "", "[1, 2, 3]", "\xff\xfe"], ids=["broken", "empty", "list", "binary"])
def test_broken_config_json_is_an_error_naming_the_file(saved, tmp_path, text):
    model, folder = saved["flowar"]
    broken = copy_folder(folder, tmp_path / "broken")
    config = broken / "config.json"
    config.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=str(config)):
        FlowAR.from_pretrained(broken)
    with pytest.raises(ValueError, match=str(config)):
        read_config(broken)
    with pytest.raises(ValueError, match=str(config)):
        model_type(broken)


def json_round_trip(config):
    return type(config).from_dict(json.loads(json.dumps(config.to_dict())))


def test_flowar_config_round_trips_through_json():
    config = get_preset("flowar-tiny", num_classes=7, sampling={"guidance_scale": 3.5, "guidance_interval": (0.1, 0.8),
                                                                 "solver": "dopri5", "atol": 1e-3, "rtol": 1e-4})
    assert config.sampling.steps is None  # dopri5 dropped the preset's steps
    data = config.to_dict()
    assert data["scales"] == [1, 2, 4, 8] and data["sampling"]["guidance_interval"] == [0.1, 0.8]
    restored = json_round_trip(config)
    assert restored == config
    assert isinstance(restored.sampling, FlowARSampling) and isinstance(restored.scales, tuple)
    assert isinstance(restored.sampling.guidance_interval, tuple) and restored.sampling.steps is None
    for name in ("flowar-s", "flowar-h"):
        assert json_round_trip(get_preset(name)) == get_preset(name)


def test_var_config_round_trips_through_json_with_its_sampling():
    config = get_var_preset("var-d16", sampling={"guidance_scale": 4.0, "cfg_schedule": "constant", "top_k": 50,
                                                 "top_p": 0.5, "temperature": 0.9, "more_smooth": True})
    restored = json_round_trip(config)
    assert restored == config and isinstance(restored.sampling, VARSampling)
    assert restored.sampling.more_smooth is True and restored.sampling.var_cfg == 3.0
    assert json_round_trip(get_var_preset("var-d36")) == get_var_preset("var-d36")


def test_msvq_config_round_trips_through_json():
    for config in (get_msvq_preset("mnist", phi_sharing="none"), get_msvq_preset("vae_ch160v4096z32")):
        restored = json_round_trip(config)
        assert restored == config and isinstance(restored, MultiScaleVQConfig)
        assert isinstance(restored.ch_mult, tuple) and isinstance(restored.scales, tuple)


def test_unknown_config_fields_are_refused_also_in_the_nested_sampling():
    data = get_preset("flowar-tiny").to_dict()
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        FlowARConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match=r"unknown fields \['top_k'\]"):
        FlowARConfig.from_dict({**data, "sampling": {**data["sampling"], "top_k": 5}})
    with pytest.raises(ValueError, match="guidance_scale"):  # the nested options are validated on load
        FlowARConfig.from_dict({**data, "sampling": {**data["sampling"], "guidance_scale": "strong"}})


def test_config_keys_of_no_field_are_refused_by_name():
    """config.json holds exactly the dataclass's fields: a key that is none of them names itself."""
    data = {"model_type": "flowar", **get_preset("flowar-tiny").to_dict(), "default_cfg": 3.0}
    with pytest.raises(ValueError, match=r"unknown fields \['default_cfg'\]"):
        FlowARConfig.from_dict(data)
    data = {"model_type": "var", **VARConfig.from_depth(2, num_classes=4).to_dict(), "default_top_k": 900}
    with pytest.raises(ValueError, match=r"unknown fields \['default_top_k'\]"):
        VARConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------- model_type
def test_model_type_picks_the_class(saved):
    expected = {"flowar": FlowAR, "var": VAR, "flexvar": FlexVAR, "xar": XAR, "tokenizer": MultiScaleVQVAE,
                "flexvq": FlexVQVAE}
    assert set(MODEL_CLASSES.values()) == set(expected.values())
    for name, (model, folder) in saved.items():
        kind = model_type(folder)
        assert json.loads((folder / "config.json").read_text())["model_type"] == kind
        assert MODEL_CLASSES[kind] is expected[name]
        loaded = load_model(folder)
        assert type(loaded) is expected[name] and same_weights(loaded, model) and not loaded.training
    assert len({model_type(folder) for _, folder in saved.values()}) == 6


def test_a_folder_without_model_type_is_refused(saved, tmp_path):
    _, folder = saved["flowar"]
    old = copy_folder(folder, tmp_path / "old")
    data = json.loads((old / "config.json").read_text())
    del data["model_type"]
    (old / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no model_type"):
        load_model(old)
    with pytest.raises(ValueError, match="holds a None model, not 'flowar'"):
        FlowAR.from_pretrained(old)


def test_the_wrong_class_or_an_unknown_type_is_refused(saved, tmp_path):
    _, var_folder = saved["var"]
    with pytest.raises(ValueError, match="holds a 'var' model, not 'flowar'"):
        FlowAR.from_pretrained(var_folder)
    _, flowar_folder = saved["flowar"]
    with pytest.raises(ValueError, match="holds a 'flowar' model, not 'multiscale_vq'"):
        MultiScaleVQVAE.from_pretrained(flowar_folder)
    odd = copy_folder(flowar_folder, tmp_path / "odd")
    data = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**data, "model_type": "unet"}))
    with pytest.raises(ValueError, match=r"holds a 'unet' model; known types are \['flexvar', 'flexvq', 'flowar', 'multiscale_vq', 'var', 'xar'\]"):
        load_model(odd)
    with pytest.raises(ValueError, match="has no pipeline"):
        pipeline_class(model_type(saved["tokenizer"][1]))
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_type(tmp_path)


# ---------------------------------------------------------------------------------------------- writes
def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_load_tokenizer_tells_the_families_apart_by_folder_or_released_keys(saved, tmp_path):
    from flowar.registry import load_tokenizer

    for name in ("tokenizer", "flexvq"):
        model, folder = saved[name]
        loaded = load_tokenizer(folder)
        assert type(loaded) is type(model) and same_weights(loaded, model)
    with pytest.raises(ValueError, match="not a tokenizer"):
        load_tokenizer(saved["flexvar"][1])
    # FlexVAR's FlexVAE.pth layout: LlamaGen's key names under "model", with a usage buffer we do not keep
    flexvq, _ = saved["flexvq"]
    torch.save({"model": {**flexvq.state_dict(), "quantize.codebook_used": torch.zeros(65536)}}, tmp_path / "flex.pth")
    # each file is told apart by its keys, then read strictly in its family's released architecture (which
    # these small ones are not)
    with pytest.raises(ValueError, match="does not match the FlexVQVAE"):
        load_tokenizer(tmp_path / "flex.pth")
    torch.save(saved["tokenizer"][0].state_dict(), tmp_path / "var.pth")
    with pytest.raises(ValueError, match="does not match the MultiScaleVQVAE"):
        load_tokenizer(tmp_path / "var.pth")
