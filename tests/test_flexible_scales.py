"""Flexible FlowAR: grid positions that any list of scales can use, training on random scale lists, and
sampling at a list given at sampling time (fewer or more scales, a larger last side)."""

import pytest
import torch
from conftest import gen, tiny_flowar, tiny_vae

from flowar import FlowARPipeline, FlowARSampling
from flowar.attention import KVCache
from vae.pyramid import check_scale_list


def flexible(seed=0, **overrides):
    return tiny_flowar(seed, positions="grid", scale_lists="random", **overrides)


def test_cached_passes_equal_the_block_causal_forward_at_an_unseen_list():
    """Scale by scale through the KV cache, the transformer gives what one block-causal pass over the whole
    list gives, for a list it was not built with: the positions and the cache follow the list."""
    model = flexible()
    sides = (1, 3, 5, 8)
    batch, width = 2, model.config.width
    labels = torch.tensor([1, 2])
    class_embedding = model.class_emb(labels)
    inputs = [class_embedding[:, None]] + [torch.randn(batch, s * s, width, generator=gen(s)) for s in sides[1:]]
    with torch.no_grad():
        full = model.transformer(torch.cat(inputs, dim=1), class_embedding, sides=sides)
        c = model.config
        cache = KVCache(model.num_layers, batch, c.num_heads, sum(s * s for s in sides), width // c.num_heads,
                        device="cpu", dtype=torch.float32)
        stepwise = torch.cat([model.transformer(x, class_embedding, sides=(s,), cache=cache)
                              for x, s in zip(inputs, sides)], dim=1)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)


def test_grid_positions_at_the_trained_side_are_the_table_itself():
    model = flexible()
    table = model.encoder_pos_grid
    at_full = model.position_embedding("encoder", (8,), slice(0, 64))
    assert torch.equal(at_full, table.flatten(2).transpose(1, 2))
    # Coarser sides are area averages of the table: the 4x4 scale's first token averages a 2x2 block.
    at_four = model.position_embedding("encoder", (4,), slice(0, 16))
    torch.testing.assert_close(at_four[0, 0], table[0, :, :2, :2].mean(dim=(1, 2)))


@pytest.mark.parametrize("sides", [(1, 4, 8), (1, 2, 3, 4, 6, 8), (1, 2, 4, 8, 12), (1, 2, 4, 8, 16)])
def test_sampling_at_any_list_gives_its_last_side(sides):
    model = flexible()
    out = model.sample_with_stats([1, 2, 3], generator=gen(0), scales=sides, steps=3)
    assert out.latents.shape == (3, model.config.token_dim, sides[-1], sides[-1])
    assert len(out.nfe_per_scale) == len(sides) and torch.isfinite(out.latents).all()


def test_the_pipeline_decodes_a_larger_last_side_to_larger_images():
    pipe = FlowARPipeline(flexible(), tiny_vae())
    small = pipe([1], generator=gen(0), output_type="np", steps=2)
    large = pipe([1], generator=gen(0), output_type="np", steps=2, scales=(1, 2, 4, 8, 16))
    assert large.shape[1] == 2 * small.shape[1] and large.shape[1:3] == (2 * small.shape[1], 2 * small.shape[2])


def test_the_trained_list_is_the_default_and_a_given_list_changes_the_samples():
    model = flexible()
    default = model.sample([4], generator=gen(1), steps=2)
    same = model.sample([4], generator=gen(1), steps=2, scales=(1, 2, 4, 8))
    other = model.sample([4], generator=gen(1), steps=2, scales=(1, 3, 8))
    assert torch.equal(default, same) and not torch.allclose(default, other)


def test_a_sequence_model_samples_only_its_own_scales():
    model = tiny_flowar()
    with pytest.raises(ValueError, match="positions='grid'"):
        model.sample([1], scales=(1, 3, 8))
    assert model.sample([1], generator=gen(0), steps=2, scales=(1, 2, 4, 8)).shape[-1] == 8


@pytest.mark.parametrize("bad", [(2, 4, 8), (1, 4, 3), (1, 1, 8), (), (1, 2.5, 8)])
def test_bad_scale_lists_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"scales must be a list of increasing integer sides or \(height, width\) "
                                         "pairs starting at 1"):
        FlowARSampling(scales=bad)


def test_per_scale_steps_must_match_the_sampled_list():
    model = flexible()
    with pytest.raises(ValueError, match=r"steps must hold one count per scale \(3 for scales"):
        model.sample([1], scales=(1, 4, 8), steps=(2, 2, 2, 2))
    assert model.sample([1], generator=gen(0), scales=(1, 4, 8), steps=(3, 2, 2)).shape[-1] == 8


def test_random_lists_start_at_one_end_at_the_latent_side_and_cover_every_side():
    model = flexible()
    g = gen(0)
    lists = [model.draw_scale_list(g) for _ in range(300)]
    for sides in lists:
        assert check_scale_list(sides) == sides and sides[-1] == 8
        assert 3 <= len(sides) <= 2 + min(8 - 2, len(model.config.scales))
    assert {s for sides in lists for s in sides} == set(range(1, 9))
    assert {len(sides) for sides in lists} == {3, 4, 5, 6}
    assert [model.draw_scale_list(gen(5)) for _ in range(2)] == [model.draw_scale_list(gen(5))] * 2


def test_a_training_step_uses_the_drawn_list_and_its_own_draws_agree():
    model = flexible().train()
    latents = torch.randn(4, 4, 8, 8, generator=gen(2))
    drawn = model.draw_randomness(4, generator=gen(3))
    out = model(latents, [0, 1, 2, 3], **drawn)
    assert len(out.loss_per_scale) == len(drawn["scales"])
    again = model(latents, [0, 1, 2, 3], generator=gen(3))  # drawn inside, from the same generator
    torch.testing.assert_close(again.loss, out.loss)
    # A given list is used as it is, with draws that follow its sides.
    fixed = model(latents, [0, 1, 2, 3], generator=gen(3), scales=(1, 5, 8))
    assert len(fixed.loss_per_scale) == 3 and torch.isfinite(fixed.loss)


def test_random_lists_need_grid_positions():
    with pytest.raises(ValueError, match="scale_lists='random'.*positions='grid'"):
        tiny_flowar(positions="sequence", scale_lists="random")


def test_editing_and_a_fixed_model_s_training_keep_the_model_s_own_scales():
    model = tiny_flowar()
    with pytest.raises(ValueError, match="trains on its own scales"):
        model.train()(torch.randn(2, 4, 8, 8), [1, 2], scales=(1, 4, 8))
    pipe = FlowARPipeline(flexible(), tiny_vae())
    side = 8 * pipe.autoencoder.downsample
    with pytest.raises(ValueError, match="editing samples the model's own scales"):
        pipe.inpaint(torch.rand(1, 3, side, side), torch.ones(side, side), 1, scales=(1, 3, 8))


def test_the_trainer_trains_on_random_lists_and_logs_each_side(tmp_path):
    from test_train import COMMON, make_cache, run_train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cache = make_cache(tmp_path / "cache")
    run_train([f"latent_cache={cache}", *COMMON, "total_steps=6", "checkpoint_every=6", f"out_dir={tmp_path / 'run'}",
               "model.positions=grid", "model.scale_lists=random"])
    tags = set(EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Tags()["scalars"])
    sides = {int(t.split("_")[-1].split("x")[0]) for t in tags if t.startswith("train/loss_scale_")}
    assert 1 in sides and 8 in sides and sides - {1, 2, 4, 8}, sides  # sides the fixed list never has
    state = torch.load(tmp_path / "run" / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 6 and "encoder_pos_grid" in state["model"]


def test_a_share_of_the_steps_trains_the_model_s_own_list():
    always = flexible(fixed_list_share=1.0)
    assert all(always.draw_scale_list(gen(i)) == (1, 2, 4, 8) for i in range(20))
    half = flexible(fixed_list_share=0.5)
    g = gen(0)
    share = sum(half.draw_scale_list(g) == (1, 2, 4, 8) for _ in range(1000)) / 1000
    assert 0.45 < share < 0.58  # 0.5, plus the random lists that happen to be (1, 2, 4, 8): about 0.008
    with pytest.raises(ValueError, match="fixed_list_share must be in"):
        flexible(fixed_list_share=1.5)


# ---------------------------------------------------------------------------------------------- non-square grids
def test_rope_of_a_grid_that_is_not_square_rotates_rows_and_columns_by_their_own_sides():
    """An h x w grid's table: token (i, j) has the row angles of token (i, 0) of the h x h grid in the first half
    of its channels and the column angles of token (0, j) of the w x w grid in the second (each axis stretched
    onto the canvas by its own length)."""
    from heads.layers import Rope2D

    rope = Rope2D(16, grid=16)
    h, w = 3, 8
    cos, sin = rope.tables(((h, w),), "cpu")
    assert cos.shape == (h * w, 16)
    rows_cos, _ = rope.tables((h,), "cpu")
    cols_cos, _ = rope.tables((w,), "cpu")
    grid_cos = cos.reshape(h, w, 16)
    torch.testing.assert_close(grid_cos[:, :, :8], rows_cos.reshape(h, h, 16)[:, :1, :8].expand(h, w, 8), rtol=0, atol=0)
    torch.testing.assert_close(grid_cos[:, :, 8:], cols_cos.reshape(w, w, 16)[:1, :, 8:].expand(h, w, 8), rtol=0, atol=0)
    square = rope.tables((h, (h, h)), "cpu")[0]
    assert torch.equal(square[:h * h], square[h * h:])  # (h, h) is the side h


def test_the_transformer_head_places_tokens_on_the_grid_it_is_given():
    """grid=(s, s) is the square default bit for bit; another grid of the same token count moves the head's
    output (its self-attention sees other positions); a grid that does not hold N tokens is refused by name."""
    model = flexible()
    head = model.flownet
    x = torch.randn(2, 16, 4, generator=gen(1))
    cond = torch.randn(2, 16, model.config.width, generator=gen(2))
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        head.final_layer.linear.weight.normal_(std=0.3, generator=gen(3))  # a fresh head's output is 0
        square = head.conditioned(cond)(x, t)
        assert torch.equal(head.conditioned(cond, (4, 4))(x, t), square)
        assert not torch.allclose(head.conditioned(cond, (2, 8))(x, t), square)
    with pytest.raises(ValueError, match=r"grid must be \(height, width\) with height \* width = N = 16"):
        head.conditioned(cond, (3, 5))


@pytest.mark.parametrize("sides", [(1, 2, 4, (8, 12)), (1, (2, 3), (4, 6), (8, 12)), (1, 2, 4, (12, 8)),
                                   (1, 2, (4, 8), (8, 16))])
def test_sampling_at_a_grid_that_is_not_square_gives_its_height_and_width(sides):
    model = flexible()
    out = model.sample_with_stats([1, 2], generator=gen(0), scales=sides, steps=2)
    assert out.latents.shape == (2, model.config.token_dim, *sides[-1])
    assert len(out.nfe_per_scale) == len(sides) and torch.isfinite(out.latents).all()


def test_cached_passes_equal_the_block_causal_forward_at_a_grid_that_is_not_square():
    model = flexible()
    sides = (1, (2, 3), (4, 6), (8, 12))
    counts = [1, 6, 24, 96]
    batch, width = 2, model.config.width
    labels = torch.tensor([3, 4])
    class_embedding = model.class_emb(labels)
    inputs = [class_embedding[:, None]] + [torch.randn(batch, n, width, generator=gen(n)) for n in counts[1:]]
    with torch.no_grad():
        full = model.transformer(torch.cat(inputs, dim=1), class_embedding, sides=sides)
        c = model.config
        cache = KVCache(model.num_layers, batch, c.num_heads, sum(counts), width // c.num_heads, device="cpu",
                        dtype=torch.float32)
        stepwise = torch.cat([model.transformer(x, class_embedding, sides=(s,), cache=cache)
                              for x, s in zip(inputs, sides)], dim=1)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)


def test_a_wide_grid_positions_each_row_like_the_square_grid_of_its_width_stretched():
    """The grid table resized to (4, 8) from the trained 8 x 8: each column of the 4 x 8 map is the area average
    of two rows of the table, no mixing across columns."""
    model = flexible()
    table = model.encoder_pos_grid  # (1, D, 8, 8)
    wide = model.position_embedding("encoder", ((4, 8),), slice(0, 32)).reshape(4, 8, -1)
    torch.testing.assert_close(wide[1, 5], table[0, :, 2:4, 5].mean(dim=1))


def test_the_pipeline_decodes_a_wide_last_grid_to_wide_images_and_seeds_give_the_rows():
    pipe = FlowARPipeline(flexible(), tiny_vae())
    sides = (1, 2, 4, (8, 12))
    images = pipe([1, 2], generator=gen(0), output_type="np", steps=2, scales=sides)
    assert images.shape[1:3] == (16, 24)  # a 2x upsampling VAE
    options = pipe.model.sampling_options(scales=sides)
    noise = pipe.model.noise_from_seeds([7, 8], options)
    assert [tuple(n.shape) for n in noise] == [(2, 1, 4), (2, 4, 4), (2, 16, 4), (2, 96, 4)]
    alone = pipe.model.noise_from_seeds([8], options)
    assert all(torch.equal(a[0], n[1]) for a, n in zip(alone, noise))


@pytest.mark.parametrize("bad", [(1, 2, (8, 4), (6, 12)), (1, (2, 3), (3, 2)), (1, (4, 4), 4), (1, (2, 0)),
                                 (1, (2, 3, 4))])
def test_grids_that_do_not_grow_in_both_directions_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"scales must be a list of increasing integer sides or \(height, width\)"):
        FlowARSampling(scales=bad)


def test_a_fixed_list_model_and_training_take_no_grid_that_is_not_square():
    with pytest.raises(ValueError, match="positions='grid'"):
        tiny_flowar().sample([1], scales=(1, 2, 4, (8, 12)))
    with pytest.raises(ValueError, match="scales must be a list of increasing integer sides starting at 1"):
        check_scale_list((1, 2, (4, 6)))
