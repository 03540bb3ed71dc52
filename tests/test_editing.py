"""Zero-shot in-/out-painting and class-conditional editing (flowar.editing) for FlowAR and VAR: the kept
region is kept exactly, a mask of ones is the autoencoder's round trip, a mask of zeros is plain sampling
(with the same generator or the same noise), and ``inpaint`` is one call of the sampling engine."""

import numpy as np
import pytest
import torch
from conftest import gen
from PIL import Image

from flowar.editing import box_mask, inpaint, prepare_images, prepare_mask, scale_masks
from flowar.sampling import generate
from heads.flow import KnownRegionNet, sample_flow

from flow_options import guide, solve

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py; flowar_pipe, var_pipe come from there


def random_image(side, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def left_columns(side, kept) -> torch.Tensor:
    mask = torch.zeros(side, side)
    mask[:, :kept] = 1
    return mask


# ---------------------------------------------------------------------------------------------- FlowAR
def test_flowar_kept_region_of_the_final_latent_is_the_ground_truth(flowar_pipe):
    image, mask = random_image(16), left_columns(16, 8)  # keep the left half
    latents = inpaint(flowar_pipe, image, mask, 3, output_type="latent", steps=3, guidance_scale=2.0,
                     generator=gen(1))
    truth = flowar_pipe.vae.encode_distribution(prepare_images(image, 16))[0]  # the posterior mean
    assert latents.shape == truth.shape == (1, 4, 8, 8)
    assert torch.equal(latents[..., :4], truth[..., :4])
    assert not torch.isclose(latents[..., 4:], truth[..., 4:]).any()  # the rest is generated
    # the generated half is conditioned on the kept half: another image there changes it
    other = inpaint(flowar_pipe, random_image(16, seed=1), mask, 3, output_type="latent", steps=3,
                    guidance_scale=2.0, generator=gen(1))
    assert not torch.equal(other[..., 4:], latents[..., 4:])


@pytest.mark.parametrize("solver, guidance_scale", [("euler", 1.0), ("midpoint", 3.0), ("dopri5", 3.0)])
def test_known_tokens_follow_the_straight_path_during_the_solve(solver, guidance_scale):
    """Every head call sees the known rows at (1 - t) x_gt + t eps, eps being the initial noise, and they end
    exactly on the target (``sample_flow(known=...)``, which wraps the network in ``KnownRegionNet``)."""
    torch.manual_seed(0)
    keep = torch.rand(2, 6, 1) < 0.5
    target, noise, cond = torch.randn(2, 6, 3), torch.randn(2, 6, 3), torch.randn(2, 6, 5)
    weight = torch.randn(3, 3)
    seen = []

    def net(x_t, t, c):
        seen.append((x_t.clone(), t.clone()))
        return x_t @ weight + c[..., :3] - t[:, None, None]

    steps = None if solver == "dopri5" else 6
    flow = sample_flow(net, noise, cond, solve(solver=solver, steps=steps, schedule="uniform"), guidance=guide(torch.zeros_like(cond), guidance_scale, (0.0, 0.7)), known=(keep, target))
    assert len(seen) == flow.nfe
    assert any(x_t.shape[0] == 4 for x_t, _ in seen) == (guidance_scale != 1.0)  # the doubled guidance batch
    for x_t, t in seen:
        repeat = x_t.shape[0] // 2
        path = (1 - t[:, None, None]) * target.repeat(repeat, 1, 1) + t[:, None, None] * noise.repeat(repeat, 1, 1)
        rows = keep.repeat(repeat, 1, 1).expand_as(x_t)
        torch.testing.assert_close(x_t[rows], path[rows], rtol=0, atol=1e-6)
    kept = keep.expand_as(flow.x)
    assert torch.equal(flow.x[kept], target[kept])
    assert not torch.isclose(flow.x[~kept], target[~kept]).any()
    # KnownRegionNet itself: the known rows move with the path's constant velocity noise - target
    wrapped = KnownRegionNet(net, keep, target, noise)
    v = wrapped(torch.randn(2, 6, 3), torch.full((2,), 0.4), cond)
    torch.testing.assert_close(v[kept], (noise - target)[kept], rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep"):
        KnownRegionNet(net, keep.float(), target, noise)


def test_inpaint_is_one_call_of_the_engine(flowar_pipe, var_pipe):
    """``inpaint`` is ``generate`` with the known regions of ``model.known_regions`` as its edit hook."""
    for pipe, side, options in ((flowar_pipe, 16, dict(steps=3, guidance_scale=2.0)), (var_pipe, 8, dict(top_k=6))):
        image, mask = random_image(side), left_columns(side, side // 2)
        model, autoencoder = pipe.model, pipe.autoencoder
        keep = scale_masks(prepare_mask(mask, (side, model.config.scales[-1])), model.config.scales)
        known = model.known_regions(autoencoder, prepare_images(image, side), keep)
        ours = generate(model, [3], autoencoder=autoencoder, batch_size=1, edit=known.__getitem__, null_labels=True,
                        generator=gen(5), **options).latent_output
        theirs = inpaint(pipe, image, mask, 3, output_type="latent", generator=gen(5), **options)
        if isinstance(theirs, list):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        else:
            assert torch.equal(ours, theirs)


def test_flowar_mask_of_ones_is_the_vae_round_trip(flowar_pipe):
    image = random_image(16, seed=2)
    ours = inpaint(flowar_pipe, image, np.ones((16, 16), dtype=bool), 5, output_type="pt", steps=2)
    vae = flowar_pipe.vae
    with torch.no_grad():
        round_trip = vae.decode(vae.encode_distribution(prepare_images(image, 16))[0]).float()
    assert torch.equal(ours, (round_trip.clamp(-1, 1) + 1) / 2)


def test_flowar_mask_of_zeros_is_ordinary_sampling(flowar_pipe):
    options = dict(steps=3, guidance_scale=2.5)
    ours = inpaint(flowar_pipe, random_image(16), torch.zeros(16, 16), [3, 4], output_type="latent",
                   generator=gen(7), **options)
    assert torch.equal(ours, flowar_pipe([3, 4], output_type="latent", generator=gen(7), **options))
    pixels = inpaint(flowar_pipe, random_image(16), torch.zeros(8, 8), [3, 4], output_type="np", generator=gen(7),
                     **options)  # a latent-sized mask
    np.testing.assert_array_equal(pixels, flowar_pipe([3, 4], output_type="np", generator=gen(7), **options))
    noise = flowar_pipe.model.noise_from_seeds([1, 2])  # the same initial noise instead of a generator
    ours = inpaint(flowar_pipe, random_image(16), torch.zeros(16, 16), [3, 4], output_type="latent", noise=noise,
                   **options)
    assert torch.equal(ours, flowar_pipe([3, 4], output_type="latent", noise=noise, **options))


def test_pipeline_method_is_the_function(flowar_pipe):
    image, mask = random_image(16), left_columns(16, 6)
    a = flowar_pipe.inpaint(image, mask, 2, generator=gen(3), output_type="np", steps=2)
    b = inpaint(flowar_pipe, image, mask, 2, generator=gen(3), output_type="np", steps=2)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- VAR
def test_var_kept_tokens_equal_the_ground_truth_at_every_scale(var_pipe):
    image, mask = random_image(8), left_columns(8, 5)
    keep = scale_masks(prepare_mask(mask, (8, 4)), (1, 2, 3, 4))
    # area shares kept: 5/8 at 1x1; [1, 1/4] at 2x2; [1, 7/8, 0] at 3x3; [1, 1, 1/2, 0] at 4x4
    assert [m[0].float().mean(0).tolist() for m in keep] == [[1.0], [1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    indices = var_pipe.inpaint(image, mask, 6, output_type="latent", generator=gen(2), var_cfg=1.0)
    truth = var_pipe.tokenizer.encode_indices(prepare_images(image, 8))
    generated = 0
    for ours, gt, m in zip(indices, truth, keep):
        assert torch.equal(ours[m], gt[m])
        generated += int((ours[~m] != gt[~m]).sum())
    assert generated > 0
    # the later scales are drawn in the context of the kept tokens: another image changes them
    other = var_pipe.inpaint(random_image(8, seed=5), mask, 6, output_type="latent", generator=gen(2), var_cfg=1.0)
    assert any(not torch.equal(a[~m], b[~m]) for a, b, m in zip(indices[2:], other[2:], keep[2:]))


def test_var_masks_of_ones_and_zeros(var_pipe):
    image = random_image(8, seed=3)
    truth = var_pipe.tokenizer.encode_indices(prepare_images(image, 8))
    kept = var_pipe.inpaint(image, np.ones((8, 8)), 1, output_type="latent", generator=gen())
    assert all(torch.equal(a, b) for a, b in zip(kept, truth))
    pt = var_pipe.inpaint(image, np.ones((8, 8)), 1, output_type="pt", generator=gen())
    assert torch.equal(pt, (var_pipe.tokenizer.decode_indices(truth).float().clamp(-1, 1) + 1) / 2)
    options = dict(var_cfg=1.5, top_k=6)
    zeros = var_pipe.inpaint(image, torch.zeros(8, 8), [1, 2], output_type="np", generator=gen(4), **options)
    np.testing.assert_array_equal(zeros, var_pipe([1, 2], output_type="np", generator=gen(4), **options))


def test_var_editing_with_given_uniforms(var_pipe):
    """VAR's noise (one uniform per token) works in editing: a mask of zeros is plain sampling with the same
    uniforms, and a partial mask keeps its region exactly and draws the rest from them (no generator)."""
    image = random_image(8, seed=3)
    noise = var_pipe.model.noise_from_seeds([5, 6])
    options = dict(var_cfg=1.5, top_k=6)
    zeros = var_pipe.inpaint(image, torch.zeros(8, 8), [1, 2], output_type="latent", noise=noise, **options)
    plain = var_pipe([1, 2], output_type="latent", noise=noise, **options)
    assert all(torch.equal(a, b) for a, b in zip(zeros, plain))
    pixels = var_pipe.inpaint(image, torch.zeros(8, 8), [1, 2], output_type="np", noise=noise, **options)
    np.testing.assert_array_equal(pixels, var_pipe([1, 2], output_type="np", noise=noise, **options))
    mask = left_columns(8, 5)
    keep = scale_masks(prepare_mask(mask, (8, 4)), (1, 2, 3, 4))
    truth = var_pipe.tokenizer.encode_indices(prepare_images(image, 8))
    edited = var_pipe.inpaint(image, mask, [1, 2], output_type="latent", noise=noise, **options)
    again = var_pipe.inpaint(image, mask, [1, 2], output_type="latent", noise=noise, **options)
    assert all(torch.equal(a, b) for a, b in zip(edited, again))  # the uniforms decide every draw
    for ours, gt, m in zip(edited, truth, keep):
        m, gt = m.expand_as(ours), gt.expand_as(ours)  # one image and mask, two labels
        assert torch.equal(ours[m], gt[m])
    with pytest.raises(ValueError, match="noise"):
        var_pipe.inpaint(image, mask, [1, 2], noise=noise[:3])


def test_var_editing_more_smooth(var_pipe):
    """more_smooth works in editing: a mask of zeros is plain more_smooth sampling with the same generator,
    a mask of ones still returns the reconstruction (kept cells mix exactly their own code), and a partial
    mask keeps its ids."""
    image = random_image(8, seed=4)
    options = dict(var_cfg=1.5, top_k=6, more_smooth=True)
    zeros = var_pipe.inpaint(image, torch.zeros(8, 8), [1, 2], output_type="np", generator=gen(4), **options)
    np.testing.assert_array_equal(zeros, var_pipe([1, 2], output_type="np", generator=gen(4), **options))
    plain = var_pipe([1, 2], output_type="np", generator=gen(4), var_cfg=1.5, top_k=6)
    assert not np.array_equal(zeros, plain)  # more_smooth really changed the images
    truth = var_pipe.tokenizer.encode_indices(prepare_images(image, 8))
    ones = var_pipe.inpaint(image, np.ones((8, 8)), 1, output_type="pt", generator=gen(), **options)
    expected = (var_pipe.tokenizer.decode_indices(truth).float().clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(ones, expected, rtol=0, atol=1e-6)
    mask = left_columns(8, 5)
    keep = scale_masks(prepare_mask(mask, (8, 4)), (1, 2, 3, 4))
    edited = var_pipe.inpaint(image, mask, 1, output_type="latent", generator=gen(2), **options)
    for ours, gt, m in zip(edited, truth, keep):
        assert torch.equal(ours[m], gt[m])


def test_without_a_label_the_null_class_is_used_and_guidance_is_moot(var_pipe, flowar_pipe):
    image, mask = random_image(8), left_columns(8, 4)
    a = var_pipe.inpaint(image, mask, None, output_type="latent", generator=gen(1), var_cfg=3.0)
    b = var_pipe.inpaint(image, mask, None, output_type="latent", generator=gen(1), var_cfg=0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    labelled = var_pipe.inpaint(image, mask, 2, output_type="latent", generator=gen(1), var_cfg=0.0)
    assert not all(torch.equal(x, y) for x, y in zip(a, labelled))
    pil = inpaint(flowar_pipe, Image.fromarray(random_image(16)), left_columns(16, 4), None, steps=2)
    assert len(pil) == 1 and pil[0].size == (16, 16)


def test_batches_broadcast(var_pipe):
    image = random_image(8)
    out = var_pipe.inpaint(image, left_columns(8, 4), [1, 2, 3], output_type="np", generator=gen())
    assert out.shape == (3, 8, 8, 3)
    masks = torch.stack([left_columns(8, 2), left_columns(8, 6)])
    assert var_pipe.inpaint(np.stack([image, image]), masks, 4, output_type="np").shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="mask"):
        var_pipe.inpaint(np.stack([image, image]), torch.zeros(3, 8, 8), 4)


# ---------------------------------------------------------------------------------------------- masks
def test_mask_resizing_rules():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 5:7] = 1  # columns 5 and 6 kept
    area = scale_masks(mask, (1, 2), mask_resize="area")
    bilinear = scale_masks(mask, (1, 2), mask_resize="bilinear")
    # area: cell (4..7) is half kept -> generated; bilinear samples column 5.5 -> 1 -> kept (the authors' rule)
    assert area[1][0, 0].tolist() == [False, False]
    assert bilinear[1][0, 0].tolist() == [False, True]
    assert scale_masks(mask, (1, 2), keep_scales=1)[0].all()  # the 1x1 scale kept whole, as the demo does
    assert not area[0].any()
    with pytest.raises(ValueError, match="mask_resize"):
        scale_masks(mask, (1, 2), mask_resize="nearest")
    with pytest.raises(ValueError, match="keep_scales"):
        scale_masks(mask, (1, 2), keep_scales=3)


def test_mask_forms_that_are_accepted():
    kept = left_columns(16, 8)
    as_float = prepare_mask(kept, (16, 8))
    assert as_float.shape == (1, 1, 16, 16)
    assert torch.equal(prepare_mask(kept.numpy().astype(bool), (16, 8)), as_float)
    assert torch.equal(prepare_mask(Image.fromarray((kept.numpy() * 255).astype(np.uint8)), (16, 8)), as_float)
    assert torch.equal(prepare_mask(kept[None, None], (16, 8)), as_float)
    assert prepare_mask(torch.full((3, 8, 8), 0.3), (16, 8)).shape == (3, 1, 8, 8)  # soft, latent-sized, batched
    # a latent-sized mask is the image-sized one it stands for
    latent = torch.rand(8, 8) > 0.5
    image_sized = latent.float().repeat_interleave(2, 0).repeat_interleave(2, 1)
    for a, b in zip(scale_masks(prepare_mask(latent, (16, 8)), (1, 2, 4, 8)),
                    scale_masks(prepare_mask(image_sized, (16, 8)), (1, 2, 4, 8))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mask, message", [
    (torch.ones(10, 10), "16x16 or 8x8"),
    (torch.ones(16, 8), "16x16 or 8x8"),
    (np.full((16, 16), 255, dtype=np.uint8), r"\[0, 1\]"),
    (torch.full((16, 16), -0.5), r"\[0, 1\]"),
    (torch.full((16, 16), float("nan")), r"\[0, 1\]"),
    (torch.ones(16), r"\(h, w\)"),
    (torch.ones(2, 3, 16, 16), r"\(h, w\)"),
    ("keep the left half", "mask must be"),
    (np.array([["a"] * 16] * 16), "mask must hold"),
])
def test_bad_masks_are_refused_naming_mask(flowar_pipe, mask, message):
    with pytest.raises(ValueError, match=message) as info:
        inpaint(flowar_pipe, random_image(16), mask, 1, steps=2)
    assert "mask" in str(info.value)


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), dtype=np.uint8), "16x16"),
    (np.zeros((16, 16, 3), dtype=np.float32), "uint8"),
    (torch.full((3, 16, 16), 2.0), r"\[0, 1\]"),
    (torch.zeros(16, 16), r"\(3, H, W\)"),
    ([], "PIL"),
])
def test_bad_images_are_refused_naming_image(flowar_pipe, image, message):
    with pytest.raises(ValueError, match=message) as info:
        inpaint(flowar_pipe, image, torch.ones(16, 16), 1, steps=2)
    assert "image" in str(info.value)


def test_bad_labels_and_pipelines_are_refused(flowar_pipe, var_pipe):
    with pytest.raises(ValueError, match="class_labels"):
        inpaint(flowar_pipe, random_image(16), torch.ones(16, 16), 10, steps=2)
    with pytest.raises(ValueError, match="pipeline"):
        inpaint(object(), random_image(16), torch.ones(16, 16), 1)
    with pytest.raises(ValueError, match="output_type"):
        var_pipe.inpaint(random_image(8), torch.ones(8, 8), 1, output_type="jpeg")


def test_box_masks_for_in_and_out_painting():
    outpaint = box_mask(16, 0.25, 0.25, 0.75, 0.75, keep_inside=True)
    assert outpaint.sum() == 64 and outpaint[4:12, 4:12].all()
    assert torch.equal(box_mask(16, 0.25, 0.25, 0.75, 0.75, keep_inside=False), 1 - outpaint)
    with pytest.raises(ValueError, match="box"):
        box_mask(16, 0.5, 0.0, 0.5, 1.0, keep_inside=True)
