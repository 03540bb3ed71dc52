"""xAR's sampling options beyond the released sampler: a step count per cell, a guidance interval, and editing
(known regions held on their path, through ``pipeline.inpaint``)."""

import numpy as np
import pytest
import torch
from conftest import gen, tiny_vae
from test_xar_model import recomputed_sample, small_model

from flowar import XARConfig, XARPipeline, XARSampling
from flowar.editing import prepare_images, prepare_mask
from flowar.sampling import generate
from flowar.xar import to_cells

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TOKENS = 16  # per cell of xar-tiny (4x4); four cells of an 8x8x4 latent


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def pipe(model):
    return XARPipeline(model, tiny_vae(0))


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)


class Spy:
    """Records every transformer call of a sampling run: (tokens, times, stored) of each ``run_cells``."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        run = self.model.run_cells

        def recorded(tokens, conditions, **kwargs):
            self.calls.append((tokens.clone(), kwargs.get("first_cell", 0), kwargs.get("store", False)))
            return run(tokens, conditions, **kwargs)

        self.model.run_cells = recorded
        return self

    def __exit__(self, *exc):
        del self.model.run_cells


# ---------------------------------------------------------------------------------------------- steps per cell
@pytest.mark.parametrize("solver", ["sde", "euler"])
def test_equal_counts_per_cell_are_the_single_count(model, solver):
    labels = [2, 7]
    one, per_cell = model.sampling_options(solver=solver, steps=4, guidance_scale=3.0), \
        model.sampling_options(solver=solver, steps=(4, 4, 4, 4), guidance_scale=3.0)
    noise = model.noise_from_seeds([5, 6], one)
    assert all(torch.equal(a, b) for a, b in zip(noise, model.noise_from_seeds([5, 6], per_cell)))
    a = model.sample_with_stats(labels, sampling=one, noise=noise)
    b = model.sample_with_stats(labels, sampling=per_cell, noise=noise)
    assert torch.equal(a.latents, b.latents) and a.head_rows == b.head_rows
    assert torch.equal(model.sample(labels, sampling=one, generator=gen(3)),
                       model.sample(labels, sampling=per_cell, generator=gen(3)))


@pytest.mark.parametrize("solver", ["sde", "euler"])
def test_each_cell_runs_its_own_count(model, solver):
    labels = torch.tensor([1, 8])
    steps = (2, 5, 3, 4)
    options = model.sampling_options(solver=solver, steps=steps, guidance_scale=2.5)
    noise = model.noise_from_seeds([1, 2], options)
    assert [tuple(n.shape) for n in noise] == [(2, n if solver == "sde" else 1, TOKENS, 4) for n in steps]
    out = model.sample_with_stats(labels, sampling=options, noise=noise)
    assert out.nfe_per_scale == list(steps)
    # Two rows per image where guided: every cell but the first of the linear ramp.
    assert out.head_rows == TOKENS * 2 * (steps[0] + 2 * sum(steps[1:]))
    want = recomputed_sample(model, labels, noise, solver=solver, steps=steps, guidance_scale=2.5,
                             cfg_schedule="linear")
    torch.testing.assert_close(out.latents, want, atol=1e-5, rtol=1e-5)


def test_a_later_cells_count_leaves_the_earlier_cells_alone(model):
    noise = model.noise_from_seeds([4], model.sampling_options(solver="euler", steps=5))  # one draw per cell
    base = to_cells(model.sample([3], noise=noise, solver="euler", steps=5), 4)
    fewer = to_cells(model.sample([3], noise=noise, solver="euler", steps=(5, 5, 2, 5)), 4)
    assert torch.equal(fewer[:, :2 * TOKENS], base[:, :2 * TOKENS])
    assert not torch.allclose(fewer[:, 2 * TOKENS:3 * TOKENS], base[:, 2 * TOKENS:3 * TOKENS])


def test_bad_counts_per_cell_are_refused_naming_steps(model):
    with pytest.raises(ValueError, match=r"steps must hold one count per cell \(4"):
        model.sample([1], steps=(4, 4, 4))
    with pytest.raises(ValueError, match="steps must be an integer >= 2 for the sde solver"):
        XARSampling(steps=(4, 1, 4, 4))
    with pytest.raises(ValueError, match="steps"):
        XARSampling(solver="euler", steps=(4, 0, 4, 4))
    with pytest.raises(ValueError, match="steps"):
        XARSampling(steps=())
    with pytest.raises(ValueError, match="steps must hold one count per cell"):
        XARConfig(latent_side=8, cell_side=4, sampling=XARSampling(steps=(4, 4)))
    with pytest.raises(ValueError, match="noise"):  # cell 1's draws are those of 5 steps, not 4
        model.sample([1], steps=(5, 4, 5, 5), noise=model.noise_from_seeds([1], model.sampling_options(steps=5)))
    saved = XARSampling.from_dict(XARSampling(steps=[6, 5, 4, 3]).to_dict())
    assert saved.steps == (6, 5, 4, 3) and saved.steps_at(2) == 4


# ---------------------------------------------------------------------------------------------- guidance interval
@pytest.mark.parametrize("solver", ["sde", "euler", "midpoint"])
def test_the_full_interval_is_the_released_sampler(model, solver):
    options = dict(solver=solver, steps=4, guidance_scale=3.0)
    noise = model.noise_from_seeds([8, 9], model.sampling_options(**options))
    default = model.sample_with_stats([4, 6], noise=noise, **options)
    full = model.sample_with_stats([4, 6], noise=noise, guidance_interval=(0.0, 1.0), **options)
    assert torch.equal(default.latents, full.latents) and default.head_rows == full.head_rows


@pytest.mark.parametrize("solver, interval", [("sde", (0.0, 0.02)), ("sde", (0.3, 0.5)), ("euler", (0.0, 0.2)),
                                              ("midpoint", (0.9, 0.95))])
def test_an_interval_without_an_evaluation_is_the_unguided_sample(model, solver, interval):
    """sde, 5 steps: times 1, 0.76, 0.52, 0.28, 0.04; euler, 4 steps: 1, 0.75, 0.5, 0.25; midpoint, 2 steps:
    1, 0.75, 0.5, 0.25. The null rows are left out altogether, so the sample is the unguided one bit for bit."""
    steps = 5 if solver == "sde" else 4 if solver == "euler" else 2
    options = dict(solver=solver, steps=steps)
    noise = model.noise_from_seeds([3, 4], model.sampling_options(**options))
    plain = model.sample_with_stats([1, 2], noise=noise, guidance_scale=1.0, **options)
    for schedule in ("linear", "constant"):
        never = model.sample_with_stats([1, 2], noise=noise, guidance_scale=4.0, cfg_schedule=schedule,
                                        guidance_interval=interval, **options)
        assert torch.equal(never.latents, plain.latents) and never.head_rows == plain.head_rows
    guided = model.sample([1, 2], generator=gen(2), guidance_scale=4.0, guidance_interval=interval, **options)
    assert torch.equal(guided, model.sample([1, 2], generator=gen(2), guidance_scale=1.0, **options))


@pytest.mark.parametrize("solver", ["sde", "euler"])
def test_a_partial_interval_guides_only_inside_it(model, solver):
    """sde, 5 steps: 0.76 and 0.52 of the five times lie in (0.3, 0.85); euler, 5 steps: 0.8, 0.6 and 0.4."""
    labels = torch.tensor([3, 5])
    options = dict(solver=solver, steps=5, guidance_scale=3.0)
    noise = model.noise_from_seeds([6, 7], model.sampling_options(**options))
    full = model.sample_with_stats(labels, noise=noise, **options)
    part = model.sample_with_stats(labels, noise=noise, guidance_interval=(0.3, 0.85), **options)
    plain = model.sample_with_stats(labels, noise=noise, **{**options, "guidance_scale": 1.0})
    inside = 2 if solver == "sde" else 3
    assert plain.head_rows == 2 * 4 * 5 * TOKENS
    assert part.head_rows == plain.head_rows + 2 * 3 * inside * TOKENS  # null rows of cells 1-3, inside only
    assert plain.head_rows < part.head_rows < full.head_rows
    assert part.nfe_per_scale == full.nfe_per_scale == [5] * 4
    want = recomputed_sample(model, labels, noise, solver=solver, steps=5, guidance_scale=3.0, cfg_schedule="linear",
                             interval=(0.3, 0.85))
    torch.testing.assert_close(part.latents, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(part.latents, full.latents, atol=1e-4)
    assert not torch.allclose(part.latents, plain.latents, atol=1e-4)


def test_the_adaptive_solver_guides_inside_the_interval_only(model):
    """dopri5's times are its own, so the null rows are carried; the evaluations outside the interval run the
    conditional rows alone, on their part of the KV cache."""
    options = dict(solver="dopri5", atol=1e-2, rtol=1e-2, guidance_scale=3.0)  # loose: a few dozen steps
    out = model.sample_with_stats([2], generator=gen(1), guidance_interval=(0.4, 0.6), **options)
    full = model.sample_with_stats([2], generator=gen(1), **options)
    assert full.head_rows == TOKENS * (full.nfe_per_scale[0] + 2 * sum(full.nfe_per_scale[1:]))
    assert TOKENS * sum(out.nfe_per_scale) < out.head_rows < TOKENS * (out.nfe_per_scale[0]
                                                                       + 2 * sum(out.nfe_per_scale[1:]))
    assert torch.isfinite(out.latents).all()


def test_bad_intervals_are_refused(model):
    with pytest.raises(ValueError, match="guidance_interval must satisfy"):
        model.sample([1], guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="guidance_interval must be two numbers"):
        XARSampling(guidance_interval=0.5)
    assert XARSampling.from_dict({"guidance_interval": [0.1, 0.7]}).guidance_interval == (0.1, 0.7)


# ---------------------------------------------------------------------------------------------- editing
def latent_of(pipe, pixels) -> torch.Tensor:
    return pipe.vae.encode_distribution(prepare_images(pixels, 16))[0]  # the posterior mean


def keep_columns(kept: int) -> torch.Tensor:
    """A 16x16 pixel mask keeping the left ``kept`` columns."""
    mask = torch.zeros(16, 16)
    mask[:, :kept] = 1
    return mask


@pytest.mark.parametrize("solver, guidance_scale", [("sde", 2.0), ("euler", 1.0), ("midpoint", 3.0), ("dopri5", 2.0)])
def test_inpaint_keeps_the_known_tokens_exactly(pipe, solver, guidance_scale):
    """Columns 0-5 of the 8x8 latent kept: cells 0 and 2 whole, half of cells 1 and 3."""
    options = dict(solver=solver, steps=4, guidance_scale=guidance_scale)
    if solver == "dopri5":
        options.update(steps=None, atol=1e-2, rtol=1e-2)  # loose: a few dozen steps per cell
    truth = latent_of(pipe, image())
    latents = pipe.inpaint(image(), keep_columns(12), 3, output_type="latent", generator=gen(1), **options)
    assert latents.shape == truth.shape == (1, 4, 8, 8)
    assert torch.equal(latents[..., :6], truth[..., :6])
    assert not torch.isclose(latents[..., 6:], truth[..., 6:]).any()
    other = pipe.inpaint(image(), keep_columns(12), 3, output_type="latent", generator=gen(2), **options)
    assert torch.equal(other[..., :6], truth[..., :6])
    assert not torch.isclose(other[..., 6:], latents[..., 6:]).any()  # the seed draws the unknown part
    elsewhere = pipe.inpaint(image(1), keep_columns(12), 3, output_type="latent", generator=gen(1), **options)
    assert not torch.equal(elsewhere[..., 6:], latents[..., 6:])  # generated in the known part's context


def test_a_mask_at_the_latents_resolution_keeps_any_token(pipe):
    mask = torch.rand(8, 8, generator=gen(4)) < 0.5
    truth = latent_of(pipe, image(2))
    latents = pipe.inpaint(image(2), mask, 5, output_type="latent", generator=gen(3), steps=3, guidance_scale=2.0)
    kept = mask.expand_as(latents)
    assert torch.equal(latents[kept], truth[kept])
    assert not torch.isclose(latents[~kept], truth[~kept]).any()


def test_an_all_known_mask_returns_the_image_latent_without_integrating(pipe):
    model = pipe.model
    truth = latent_of(pipe, image(3))
    assert torch.equal(pipe.inpaint(image(3), torch.ones(16, 16), 2, output_type="latent", steps=3), truth)
    keep = model.edit_masks(prepare_mask(torch.ones(16, 16), (16, 8)))
    known = model.known_regions(pipe.vae, prepare_images(image(3), 16), keep)
    out = generate(model, [2], batch_size=1, edit=known.__getitem__, null_labels=True, steps=3)
    assert torch.equal(out.latents, truth) and out.nfe_per_scale == [0] * 4 and out.head_rows == 0


def test_a_mask_of_zeros_is_ordinary_sampling(pipe):
    options = dict(steps=3, guidance_scale=2.5)
    ours = pipe.inpaint(image(), torch.zeros(16, 16), [3, 4], output_type="latent", generator=gen(7), **options)
    assert torch.equal(ours, pipe([3, 4], output_type="latent", generator=gen(7), **options))


@pytest.mark.parametrize("solver", ["sde", "euler", "rk4"])
def test_known_tokens_are_on_their_path_at_every_evaluation(pipe, solver):
    """Cell k's known rows go into every transformer evaluation at (1 - t) x + t eps_k, eps_k the cell's initial
    noise; a cell known whole is not evaluated, and every cell is fed to the next as its clean context."""
    model, steps = pipe.model, 4
    mask = torch.rand(8, 8, generator=gen(5)) < 0.5
    mask[:4, :4] = True  # cell 0 known whole
    keep = model.edit_masks(prepare_mask(mask, (16, 8)))
    known = model.known_regions(pipe.vae, prepare_images(image(4), 16), keep)
    noise = model.noise_from_seeds([9], model.sampling_options(solver=solver, steps=steps))
    with Spy(model) as spy:
        out = generate(model, [6], edit=known.__getitem__, noise=noise, solver=solver, steps=steps,
                       guidance_scale=2.0)
    assert out.nfe_per_scale[0] == 0 and out.nfe_per_scale[1:] == [steps * (4 if solver == "rk4" else 1)] * 3
    result = to_cells(out.latents, 4)
    evaluated = 0
    for tokens, cell, stored in spy.calls:
        if stored:  # the clean context: the cell before, as sampled (cell 0: the image's own tokens)
            assert torch.equal(tokens[:1], result[:, cell * TOKENS:(cell + 1) * TOKENS])
            continue
        assert cell > 0
        evaluated += 1
        rows, target = known[cell][0][0, :, 0], known[cell][1][0]
        eps = noise[cell][0, 0]
        # the time of this call: from a known token, t = (x_t - x) / (eps - x)
        x_t = tokens[0]
        t = ((x_t[rows] - target[rows]) / (eps[rows] - target[rows])).median()
        torch.testing.assert_close(x_t[rows], (1 - t) * target[rows] + t * eps[rows], rtol=0, atol=1e-5)
    assert evaluated == sum(out.nfe_per_scale)
    for k in range(4):
        rows = known[k][0][0, :, 0]
        assert torch.equal(result[0, k * TOKENS:(k + 1) * TOKENS][rows], known[k][1][0][rows])


def test_masks_map_onto_the_cells_of_the_latent(model):
    mask = (torch.rand(2, 1, 8, 8, generator=gen(6)) < 0.5).float()
    maps = model.edit_masks(mask)
    assert len(maps) == 4 and all(m.shape == (2, 4, 4) and m.dtype == torch.bool for m in maps)
    assert torch.equal(torch.cat([m.flatten(1) for m in maps], 1), to_cells(mask > 0.5, 4)[..., 0])
    pixels = mask.repeat_interleave(2, -1).repeat_interleave(2, -2)  # the same mask at the image's size
    assert all(torch.equal(a, b) for a, b in zip(model.edit_masks(pixels), maps))
    first_whole = model.edit_masks(mask, keep_scales=1)
    assert first_whole[0].all() and all(torch.equal(a, b) for a, b in zip(first_whole[1:], maps[1:]))
    with pytest.raises(ValueError, match="keep_scales"):
        model.edit_masks(mask, keep_scales=5)
    with pytest.raises(ValueError, match="keep"):
        model.known_regions(tiny_vae(0), torch.zeros(2, 3, 16, 16), maps[:3])
