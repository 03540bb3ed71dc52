"""FlexVAR: positions that fit any side, released files, block-causal attention over any list of sides, the cached
sampler against teacher forcing, the released sampler's ramp and greedy sides, random-list training, the pipeline."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import gen

from flowar import FlexVAR, FlexVARPipeline, FlexVARSampling, get_flexvar_preset
from flowar.flexvar import convert_released_flexvar_state_dict, sinusoid_position_table
from flowar.flexvar_config import FlexVARConfig
from flowar.registry import load_pipeline
from heads.categorical import CategoricalHead
from vae.flexvq import FlexVQVAE, get_flexvq_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

RELEASED = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@pytest.fixture(scope="module")
def tokenizer() -> FlexVQVAE:
    torch.manual_seed(0)
    return FlexVQVAE(get_flexvq_preset("mnist")).eval()


def small_model(seed: int = 0, **overrides) -> FlexVAR:
    """flexvar-tiny at two blocks of width 64, with full-scale random weights: the released init leaves every
    block almost closed (gates 1e-5), which would hide a wrong block."""
    torch.manual_seed(seed)
    model = FlexVAR(get_flexvar_preset("flexvar-tiny", depth=2, width=64, num_heads=2, **overrides))
    g = gen(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1 / math.sqrt(param.shape[1]) if param.ndim == 2 and "emb" not in name else 0.3
            param.copy_(torch.randn(param.shape, generator=g) * scale)
    return model.eval()


def teacher_forced_logits(model, tokenizer, indices, labels, sides):
    inputs = tokenizer.teacher_forcing_inputs(indices, sides)
    return model.logits(inputs, labels, sides=sides)


# ---------------------------------------------------------------------------------------------- positions
def test_position_table_holds_row_sines_and_column_cosines():
    table = sinusoid_position_table(5, 8)[0]  # (8, 5, 5)
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    for i in range(4):
        freq = 10000 ** (-2 * i / 8)
        torch.testing.assert_close(table[2 * i], torch.sin(rows * freq))
        torch.testing.assert_close(table[2 * i + 1], torch.cos(cols * freq))
    with pytest.raises(ValueError, match="width"):
        sinusoid_position_table(4, 7)


def test_positions_are_the_table_averaged_over_each_cell():
    model = small_model()
    table = model.pos_1LC[0]  # (D, 8, 8)
    positions = model.input_positions((1, 4, 8))[0]  # (1 + 16 + 64, D)
    torch.testing.assert_close(positions[0], table.mean(dim=(1, 2)))
    # side 4: position (r, c) is the mean of the 2x2 cell (2r..2r+1, 2c..2c+1)
    torch.testing.assert_close(positions[1 + 4 * 1 + 2], table[:, 2:4, 4:6].mean(dim=(1, 2)))
    torch.testing.assert_close(positions[17:].T.reshape(-1, 8, 8), table)  # the table's own side: row-major


# ---------------------------------------------------------------------------------------------- released files
# Parameters of the authors' FlexVAR (their V 8912, 1024-cell position table, no level embedding). Derived
# from VAR's released counts (tests/test_var_model.py, from their code): + (8912 - 4096) (C + 1) head rows,
# + (1024 - 680) C positions, - 10 C level embeddings. tools/parity_flexvar.py prints theirs for d16.
THEIR_PARAMETERS = {16: 315_561_936, 20: 607_513_952, 24: 1_041_314_576}


@pytest.mark.parametrize("depth", sorted(THEIR_PARAMETERS))
def test_released_parameter_counts(depth):
    with torch.device("meta"):
        model = FlexVAR(get_flexvar_preset(f"flexvar-d{depth}"))
    assert sum(p.numel() for p in model.parameters()) == THEIR_PARAMETERS[depth]


def released_state(model: FlexVAR) -> dict:
    """Our weights in the authors' layout: plus their block-causal mask buffer and the all-zero key biases."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sides = model.config.scales
    level = torch.cat([torch.full((s * s,), i) for i, s in enumerate(sides)])
    state["attn_bias_for_masking"] = torch.where(level[:, None] >= level[None, :], 0.0, -math.inf)[None, None]
    for i in range(model.config.depth):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.config.width)
    return state


def test_released_file_loads_strictly_bare_or_in_a_trainer_checkpoint(tmp_path):
    model = small_model(seed=3)
    state = released_state(model)
    torch.save(state, tmp_path / "bare.pth")
    torch.save({"trainer": {"var_wo_ddp": state, "config": {"patch_nums": [1, 2]}}, "epoch": 3},
               tmp_path / "trainer.pth")
    for name in ("bare.pth", "trainer.pth"):
        loaded = FlexVAR.from_released(tmp_path / name, model.config)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    bad = dict(state, **{"blocks.1.attn.zero_k_bias": torch.ones(model.config.width)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="blocks.1.attn.zero_k_bias"):
        FlexVAR.from_released(tmp_path / "bad.pth", model.config)
    missing = {k: v for k, v in state.items() if k != "pos_1LC"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="pos_1LC"):
        FlexVAR.from_released(tmp_path / "missing.pth", model.config)
    assert "attn_bias_for_masking" not in convert_released_flexvar_state_dict(state)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("sides", [(1, 2, 4, 8), (1, 3, 5, 8), (1, 2, 3, 4, 5, 6, 7, 8)])
def test_block_causal_later_scales_never_change_earlier_logits(tokenizer, sides):
    model = small_model()
    g = gen(1)
    indices = [torch.randint(0, 64, (2, s, s), generator=g) for s in sides]
    inputs = tokenizer.teacher_forcing_inputs(indices, sides)
    logits = model.logits(inputs, [1, 2], sides=sides)
    changed = inputs.clone()
    boundary = sum(s * s for s in sides[:2]) - 1  # inputs of scales 3.. start here
    changed[:, boundary:] += torch.randn(changed[:, boundary:].shape, generator=g)
    other = model.logits(changed, [1, 2], sides=sides)
    first_two = sum(s * s for s in sides[:2])
    torch.testing.assert_close(other[:, :first_two], logits[:, :first_two], rtol=0, atol=1e-5)
    assert not torch.allclose(other[:, first_two:], logits[:, first_two:], atol=1e-3)  # the test can fail


@pytest.mark.parametrize("sides", [(1, 2, 4, 8), (1, 3, 6, 8), (1, 2, 4, 8, 12)])
def test_cached_greedy_sampling_equals_teacher_forcing(tokenizer, sides):
    """A list the model never saw, and a last side above the trained 8, sampled greedily with the KV cache:
    each scale's ids are the argmax of the teacher-forced logits of those ids."""
    model = small_model()
    labels = [3, 7]
    out = model.sample(labels, tokenizer=tokenizer, scales=sides, temperature=0.0, guidance_scale=1.0)
    assert [tuple(i.shape) for i in out.indices] == [(2, s, s) for s in sides]
    logits = teacher_forced_logits(model, tokenizer, out.indices, torch.tensor(labels), sides)
    start = 0
    for side, ids in zip(sides, out.indices):
        end = start + side * side
        assert torch.equal(logits[:, start:end].argmax(-1), ids.flatten(1)), side
        start = end
    assert len({tuple(i.flatten().tolist()) for i in out.indices[-1:]}) == 1 and out.indices[-1].unique().numel() > 3


# ---------------------------------------------------------------------------------------------- the sampler's rules
def record_draws(monkeypatch) -> list[dict]:
    calls = []
    original = CategoricalHead.sample

    def recording(self, logits, null_logits=None, **kwargs):
        calls.append({"guidance": kwargs["guidance"], "top_k": kwargs["top_k"], "tokens": logits.shape[1]})
        return original(self, logits, null_logits, **kwargs)

    monkeypatch.setattr(CategoricalHead, "sample", recording)
    return calls


def test_released_ramp_greedy_sides_and_full_guidance_above_greedy_above(monkeypatch, tokenizer):
    """The released sampler on a 13-scale list: guidance t = cfg * k / 9 (so above cfg after the tenth scale),
    sides outside VAR's pyramid greedy (top-k 1), sides above max_pn greedy at cfg exactly."""
    model = small_model(max_side=20, position_side=8)
    calls = record_draws(monkeypatch)
    sides = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18)
    options = FlexVARSampling(guidance_scale=3.0, top_k=5, greedy_above=16, sampled_sides=(1, 2, 3, 4, 5, 6, 8, 10, 16))
    model.sample([1], tokenizer=tokenizer, sampling=options, scales=sides, generator=gen())
    assert [c["tokens"] for c in calls] == [s * s for s in sides]
    expected_t = [2.0 * k / 9 for k in range(13)] + [2.0]
    assert [c["guidance"] for c in calls] == pytest.approx(expected_t)
    greedy = {7, 9, 12, 14, 18}
    assert [c["top_k"] for c in calls] == [1 if s in greedy else 5 for s in sides]
    # guidance_ramp=0 ramps over the whole list, as VAR does; no sampled_sides samples every side
    calls.clear()
    model.sample([1], tokenizer=tokenizer, sampling=options.replace(guidance_ramp=0), scales=sides[:13],
                 sampled_sides=(), generator=gen())
    assert [c["guidance"] for c in calls] == pytest.approx([2.0 * k / 12 for k in range(13)])
    assert all(c["top_k"] == 5 for c in calls)


def test_seeded_samples_repeat_and_each_image_depends_on_its_own_uniforms(tokenizer):
    model = small_model()
    sides = (1, 3, 5, 8)
    options = model.sampling_options(scales=sides, top_k=8)
    a = model.sample([1, 2], tokenizer=tokenizer, sampling=options, generator=gen(5))
    b = model.sample([1, 2], tokenizer=tokenizer, sampling=options, generator=gen(5))
    c = model.sample([1, 2], tokenizer=tokenizer, sampling=options, generator=gen(6))
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not torch.equal(a.indices[-1], c.indices[-1])
    noise = model.noise_from_seeds([11, 12, 13], options)
    assert [tuple(u.shape) for u in noise] == [(3, s * s) for s in sides]
    batch = model.sample([4, 5, 6], tokenizer=tokenizer, sampling=options, noise=noise)
    alone = model.sample([5], tokenizer=tokenizer, sampling=options, noise=model.noise_from_seeds([12], options))
    assert all(torch.equal(x[1:2], y) for x, y in zip(batch.indices, alone.indices))
    with pytest.raises(ValueError, match="noise"):
        model.sample([1], tokenizer=tokenizer, sampling=options, noise=model.noise_from_seeds([1]))  # other sides


def test_more_smooth_feeds_mixed_code_vectors(tokenizer):
    model = small_model()
    plain = model.sample([1], tokenizer=tokenizer, generator=gen(2))
    smooth = model.sample([1], tokenizer=tokenizer, generator=gen(2), more_smooth=True)
    assert smooth.codes.shape == plain.codes.shape == (1, 16, 8, 8)
    # a mixture of unit vectors is shorter than one unless a single code dominates
    norms = smooth.codes.norm(dim=1)
    assert norms.max() <= 1 + 1e-5 and norms.min() < 0.999


@pytest.mark.parametrize("scales, match", [
    ((2, 4, 8), "scales"), ((1, 4, 3, 8), "scales"), ((1, 0, 8), "scales"), ((1, 2, 4, 40), "max_side"),
    ("1,2", "scales"),
])
def test_bad_scale_lists_name_the_argument(tokenizer, scales, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        model.sample([1], tokenizer=tokenizer, scales=scales)


def test_bad_options_and_config_fields_name_themselves(tokenizer):
    model = small_model()
    for options, name in ((dict(guidance_ramp=1), "guidance_ramp"), (dict(greedy_above=0), "greedy_above"),
                          (dict(sampled_sides=(1, -2)), "sampled_sides"), (dict(steps=3), "steps")):
        with pytest.raises(ValueError, match=name):
            model.sample([1], tokenizer=tokenizer, **options)
    for fields, name in ((dict(scale_lists="sometimes"), "scale_lists"), (dict(fixed_list_share=2.0), "fixed_list_share"),
                         (dict(max_tokens=10), "max_tokens"), (dict(scales=(1, 2, 64)), "max_side")):
        with pytest.raises(ValueError, match=name):
            get_flexvar_preset("flexvar-tiny", **fields)
    wrong = FlexVQVAE(get_flexvq_preset("mnist", codebook_size=32))
    with pytest.raises(ValueError, match="tokenizer"):
        model.sample([1], tokenizer=wrong)


# ---------------------------------------------------------------------------------------------- training
def test_random_list_law_at_the_released_size():
    with torch.device("meta"):
        model = FlexVAR(FlexVARConfig(depth=1, width=64, num_heads=1, vocab_size=16, num_classes=2))
    g = gen(0)
    lists = [model.draw_scale_list(g) for _ in range(4000)]
    counts = Counter(lists)
    assert 0.035 < counts[RELEASED] / len(lists) < 0.065  # 5% the released list (plus rare random equals)
    for sides in lists:
        assert sides[:2] == (1, 2) and list(sides) == sorted(set(sides)) and sides[-1] <= 16
        assert sum(s * s for s in sides) <= 680
        if sides != RELEASED:
            assert sum(3 <= s <= 10 for s in sides) <= 5 and sum(11 <= s <= 15 for s in sides) <= 2
    assert sum(sides[-1] == 16 for sides in lists) / len(lists) > 0.5
    assert len(counts) > 500  # many different ways through the pyramid


def test_training_forward_draws_its_list_from_the_generator(tokenizer):
    model = small_model().train()
    features = tokenizer.encode(torch.rand(3, 3, 32, 32) * 2 - 1)
    out = model(features, [1, 2, 3], tokenizer=tokenizer, generator=gen(4))
    again = model(features, [1, 2, 3], tokenizer=tokenizer, generator=gen(4))
    draws = model.draw_randomness(3, generator=gen(4))
    assert out.loss.item() == again.loss.item() and math.isfinite(out.loss.item())
    assert out.loss_per_scale.shape == (len(draws["scales"]),)
    out.loss.backward()
    assert model.pos_1LC.grad is not None and model.pos_1LC.grad.abs().sum() > 0
    # the loss is the mean cross entropy of the tokenizer's ids at those sides
    model.eval()
    sides = (1, 3, 5, 8)
    loss = model(features, [1, 2, 3], tokenizer=tokenizer, scales=sides).loss
    indices = tokenizer.indices_from_features(features, sides)
    logits = teacher_forced_logits(model, tokenizer, indices, torch.tensor([1, 2, 3]), sides)
    targets = torch.cat([i.flatten(1) for i in indices], dim=1)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="features"):
        model(features, [1, 2, 3], tokenizer=tokenizer, scales=(1, 2, 12))


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_saves_loads_and_samples_larger_images(tmp_path, tokenizer):
    pipe = FlexVARPipeline(small_model(), tokenizer)
    pt = pipe([1, 2], output_type="pt", generator=gen())
    assert pt.shape == (2, 3, 32, 32)
    large = pipe([1, 2], output_type="pt", generator=gen(), scales=(1, 2, 4, 8, 12))
    assert large.shape == (2, 3, 48, 48)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe")
    assert isinstance(loaded, FlexVARPipeline)
    a = pipe([4, 5], output_type="np", generator=gen(1), scales=(1, 3, 8))
    b = loaded([4, 5], output_type="np", generator=gen(1), scales=(1, 3, 8))
    np.testing.assert_array_equal(a, b)
    other = FlexVARPipeline(small_model(seed=1), tokenizer)
    assert not np.array_equal(a, other([4, 5], output_type="np", generator=gen(1), scales=(1, 3, 8)))
