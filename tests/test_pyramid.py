"""The scale pyramid: area targets, next-scale inputs, scale validation."""

import pytest
import torch

from vae.pyramid import area_pyramid, check_scales, next_scale_input


@pytest.mark.parametrize("scales", [(1, 2, 4, 8, 16), (1, 2, 4, 8)])
def test_area_pyramid_shapes_and_last_is_latent(scales):
    latent = torch.randn(2, 16, scales[-1], scales[-1])
    pyramid = area_pyramid(latent, scales)
    assert [tuple(t.shape) for t in pyramid] == [(2, 16, s, s) for s in scales]
    assert torch.equal(pyramid[-1], latent)


def test_area_targets_are_block_means():
    latent = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    pyramid = area_pyramid(latent, (1, 2, 4, 8, 16))
    torch.testing.assert_close(pyramid[0][..., 0, 0], latent.mean(dim=(-2, -1)))
    # Side 4: each target pixel averages its own 4x4 block of the 16x16 latent.
    blocks = latent.reshape(3, 4, 4, 4, 4, 4).mean(dim=(3, 5))  # (B, C, 4, 4)
    torch.testing.assert_close(pyramid[2], blocks)


def test_next_scale_input_shape_and_constant_stays_constant():
    for side, nxt in [(1, 2), (2, 4), (8, 16)]:
        latent = torch.full((2, 16, side, side), 0.75)
        out = next_scale_input(latent, full_side=16, next_side=nxt)
        assert out.shape == (2, 16, nxt, nxt)
        torch.testing.assert_close(out, torch.full_like(out, 0.75))


def test_next_scale_input_keeps_channels_apart():
    latent = torch.zeros(1, 2, 4, 4)
    latent[:, 1] = torch.randn(4, 4)
    out = next_scale_input(latent, full_side=16, next_side=8)
    assert torch.count_nonzero(out[:, 0]) == 0
    assert torch.count_nonzero(out[:, 1]) > 0


@pytest.mark.parametrize("bad", [(), (2, 4, 8), (1, 3, 9), (1, 2, 4, 6), (1, 2, 2)])
def test_check_scales_rejects_bad_lists(bad):
    with pytest.raises(ValueError, match="scales"):
        check_scales(bad)


def test_check_scales_accepts_doubling_lists():
    assert check_scales([1, 2, 4]) == (1, 2, 4)
    assert check_scales((1,)) == (1,)


def test_area_pyramid_rejects_latent_of_wrong_side():
    with pytest.raises(ValueError, match="latent"):
        area_pyramid(torch.randn(1, 16, 8, 8), (1, 2, 4, 8, 16))
