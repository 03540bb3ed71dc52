"""Saving, loading, the released key layout, and the preset sizes."""

import json

import pytest
import torch

from flowar import FlowAR, get_preset


def released_keys(encoder_depth, decoder_depth, head_depth, head_variant):
    """The key names of the authors' FlowAR state dict (models/flowar.py + models/flowmodel.py)."""
    keys = {
        "mask", "class_emb.weight", "z_proj.weight", "z_proj.bias", "z_proj_ln.weight",
        "encoder_pos_embed_learned", "encoder_norm.weight", "decoder_embed.weight", "decoder_embed.bias",
        "decoder_pos_embed_learned", "decoder_norm.weight", "diffusion_pos_embed_learned",
    }
    ar_block = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "attn.rope.freqs",
                "mlp.fc1_g.weight", "mlp.fc1_g.bias", "mlp.fc1_x.weight", "mlp.fc1_x.bias",
                "mlp.fc2.weight", "mlp.fc2.bias", "ada_lin.1.weight", "ada_lin.1.bias"]
    for stack, depth in (("encoder_blocks", encoder_depth), ("decoder_blocks", decoder_depth)):
        keys |= {f"{stack}.{i}.{name}" for i in range(depth) for name in ar_block}
    head = {"time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight", "time_embed.mlp.2.bias",
            "cond_embed.weight", "cond_embed.bias", "input_proj.weight", "input_proj.bias",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    block = ["attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "attn.rope.freqs",
             "mlp.fc1_g.weight", "mlp.fc1_g.bias", "mlp.fc1_x.weight", "mlp.fc1_x.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    if head_variant == "v1":
        block += ["ada_lin.weight", "ada_lin.bias"]
    else:
        block += ["crossattn.q.weight", "crossattn.kv.weight", "crossattn.proj.weight", "crossattn.proj.bias",
                  "crossattn.rope.freqs", "norm2_1.weight", "norm2_2.weight",
                  "ada_lin_attn.weight", "ada_lin_attn.bias", "ada_lin_mlp.weight", "ada_lin_mlp.bias"]
    head |= {f"res_blocks.{i}.{name}" for i in range(head_depth) for name in block}
    return keys | {f"flownet.{k}" for k in head}


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_state_dict_in_released_layout_loads_without_missing_or_unexpected(tmp_path, variant):
    config = get_preset("flowar-tiny", head=f"transformer-{variant}")
    ours = FlowAR(config).state_dict()
    expected = released_keys(2, 2, 2, variant)
    assert set(ours) == expected - {"mask"}
    # A state dict written as the authors' code writes it: their keys, the dense float mask included.
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in ours.items()}
    for k in state:
        if k.endswith("rope.freqs"):
            state[k] = ours[k].clone()
    length = config.seq_len
    allowed = torch.zeros(length, length, dtype=torch.bool)
    start = 0
    for side in config.scales:
        allowed[start:start + side * side, :start + side * side] = True
        start += side * side
    state["mask"] = torch.where(allowed, 0.0, float("-inf"))[None, None]
    path = tmp_path / "FlowAR-T.pth"
    torch.save(state, path)
    model = FlowAR.from_released(path, config)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_checkpoint_of_another_preset_lists_the_mismatched_keys(tmp_path):
    bigger = FlowAR(get_preset("flowar-tiny", encoder_depth=3, width=96, num_heads=4))
    path = tmp_path / "other.pth"
    torch.save(bigger.state_dict(), path)
    with pytest.raises(ValueError) as err:
        FlowAR.from_released(path, "flowar-tiny")
    message = str(err.value)
    assert "unexpected: encoder_blocks.2." in message
    assert "shape mismatch" in message and "class_emb.weight: checkpoint (11, 96) vs model (11, 64)" in message


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = FlowAR(get_preset("flowar-tiny", num_classes=5, scales=(1, 2, 4))).eval()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "flowar" and config["num_classes"] == 5 and config["scales"] == [1, 2, 4]
    # the saved sampling defaults are one nested object (flowar-tiny: guidance 2.0, 10 steps, interval 0-0.9)
    assert config["sampling"]["guidance_scale"] == 2.0 and config["sampling"]["steps"] == 10
    assert config["sampling"]["guidance_interval"] == [0.0, 0.9]
    assert not any(key.startswith("default_") for key in config)
    loaded = FlowAR.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.sample([0, 4], steps=3, generator=g1), loaded.sample([0, 4], steps=3, generator=g2))
    assert not list(tmp_path.glob("m/.*tmp*")), "no temporary files are left behind"


def test_from_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        FlowAR.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        FlowAR.from_pretrained(tmp_path)
    FlowAR(get_preset("flowar-tiny")).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FlowAR.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="preset"):
        FlowAR.from_released(tmp_path / "x.pth", "flowar-xxl")
    with pytest.raises(FileNotFoundError, match="x.pth"):
        FlowAR.from_released(tmp_path / "x.pth", "flowar-tiny")


@pytest.mark.parametrize(
    "preset, millions",
    [("flowar-s", 171.7), ("flowar-l", 586.9), ("flowar-h", 1910.0)],
)
def test_released_preset_parameter_counts(preset, millions):
    with torch.device("meta"):
        model = FlowAR(get_preset(preset))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.005, f"{preset}: {count:.1f}M, expected {millions}M"


def test_flowar_b_is_about_300m_and_s_splits_like_the_paper():
    with torch.device("meta"):
        b = FlowAR(get_preset("flowar-b"))
        s = FlowAR(get_preset("flowar-s"))
    assert abs(sum(p.numel() for p in b.parameters()) / 1e6 - 300) < 15
    head = sum(p.numel() for p in s.flownet.parameters()) / 1e6
    assert abs(head - 42.0) / 42.0 < 0.005
