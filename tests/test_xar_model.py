"""xAR: cells and their RoPE positions, released files, the block-causal training pass, the cached cell-by-cell
sampler against a recompute without cache, the SDE and ODE samplers on a known flow, guidance per cell, per-image
seeds, training, the pipeline and bad input."""

import json
import math

import pytest
import torch
from conftest import gen, tiny_vae

from flowar import XAR, XARConfig, XARPipeline, XARSampling, collaborative_sample, get_xar_preset
from flowar.registry import load_model, load_pipeline
from flowar.xar import euler_maruyama, from_cells, to_cells
from heads.solvers import SolveOptions, integrate

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_model(seed: int = 0, **overrides) -> XAR:
    """xar-tiny (8x8x4 latents, four 4x4 cells, 2 + 2 blocks of 64) with full-scale random weights: the released
    init (xavier, zero biases, unit norm gains) would hide a wrong bias, gain or adaLN chunk."""
    torch.manual_seed(seed)
    model = XAR(get_xar_preset("xar-tiny", **overrides))
    g = gen(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if param.ndim == 2 and name != "class_emb.weight":
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif name.endswith(("norm.weight", "_ln.weight")):
                param.copy_(1 + 0.3 * noise)
            else:
                param.copy_(0.3 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> XAR:
    return small_model()


def conditions_at(model, labels, times):
    """Per-cell conditions for labels (B,) and times (B, m)."""
    return model.cell_conditions(model.class_emb(labels), times)


# ---------------------------------------------------------------------------------------------- cells
def test_cells_are_row_major_squares_in_row_major_order():
    latent = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens = to_cells(latent, 4)  # (2, 64, 3)
    for k in range(4):
        r, c = divmod(k, 2)
        block = latent[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]  # (2, 3, 4, 4)
        assert torch.equal(tokens[:, 16 * k:16 * (k + 1)], block.flatten(2).transpose(1, 2))
    assert torch.equal(from_cells(tokens, 8, 4), latent)


def eva_tables(head_dim: int, side: int, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The released RoPE tables, written from the fact sheet: frequencies theta^(-2i / (head_dim / 2)), each
    repeated for a channel pair; the first half of a head's channels rotates with the token's row, the second
    with its column; rows of the table in cell order."""
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(0, half, 2).float() / half)
    angles = []
    for k in range((side // cell) ** 2):
        r, c = divmod(k, side // cell)
        for j in range(cell * cell):
            row, col = r * cell + j // cell, c * cell + j % cell
            angles.append(torch.cat([(row * freqs).repeat_interleave(2), (col * freqs).repeat_interleave(2)]))
    angles = torch.stack(angles)
    return angles.cos(), angles.sin()


def test_rope_follows_each_token_to_its_place_in_the_latent(model):
    cos, sin = model.rope_tables(torch.device("cpu"))
    want_cos, want_sin = eva_tables(16, 8, 4)
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(sin, want_sin)


# ---------------------------------------------------------------------------------------------- released files
def released_state(model: XAR) -> dict:
    """The authors' layout of ``model``'s weights, built by hand: our keys (the released names), the additive
    block-causal mask over the cells, and every block's cell-ordered RoPE tables."""
    c = model.config
    cell = torch.arange(c.seq_len) // c.cell_tokens
    mask = torch.where(cell[None, :] <= cell[:, None], 0.0, float("-inf"))[None, None]
    cos, sin = eva_tables(c.head_dim, c.latent_side, c.cell_side)
    state = {"mask": mask, **{k: v.clone() for k, v in model.state_dict().items()}}
    for group, depth in (("encoder_blocks", c.encoder_depth), ("decoder_blocks", c.decoder_depth)):
        for i in range(depth):
            state[f"{group}.{i}.attn.rope.freqs_cos"] = cos.clone()
            state[f"{group}.{i}.attn.rope.freqs_sin"] = sin.clone()
    return state


def test_released_file_loads_strictly_and_checks_its_constant_buffers(tmp_path, model):
    state = released_state(model)
    assert "encoder_blocks.0.attn.rope.freqs" in state and "time_embed.mlp.2.weight" in state
    torch.save(state, tmp_path / "xAR-tiny.pth")
    loaded = XAR.from_released(tmp_path / "xAR-tiny.pth", model.config)
    tokens = torch.randn(2, 64, 4, generator=gen(1))
    conditions = conditions_at(model, torch.tensor([1, 2]), torch.rand(2, 4, generator=gen(2)))
    assert torch.equal(loaded.run_cells(tokens, conditions), model.run_cells(tokens, conditions))

    def refused(change, match):
        broken = dict(state)
        change(broken)
        torch.save(broken, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=match):
            XAR.from_released(tmp_path / "bad.pth", model.config)

    refused(lambda s: s.pop("pred.bias"), "missing: pred.bias")
    refused(lambda s: s.update(fake_latent=torch.zeros(1, 64)), "unexpected: fake_latent")
    cos, _ = eva_tables(16, 8, 8)  # one cell: the row-major table, not reordered into cells
    refused(lambda s: s.update({"decoder_blocks.1.attn.rope.freqs_cos": cos}), "decoder_blocks.1.attn.rope.freqs_cos")
    causal = torch.full((64, 64), float("-inf")).triu(1)[None, None]  # token-causal, not block-causal
    refused(lambda s: s.update(mask=causal), "block-causal mask")
    with pytest.raises(ValueError, match="shape mismatch"):
        XAR.from_released(tmp_path / "xAR-tiny.pth", get_xar_preset("xar-tiny", width=128, num_heads=8))
    with pytest.raises(FileNotFoundError):
        XAR.from_released(tmp_path / "missing.pth", model.config)


def test_preset_sizes_are_the_published_ones():
    """The paper's sizes, B 172M, L 608M, H 1.1B, are truncated (not rounded) counts."""
    counts = {}
    for name in ("xar-b", "xar-l", "xar-h"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in XAR(get_xar_preset(name)).parameters())
    assert int(counts["xar-b"] / 1e6) == 172
    assert int(counts["xar-l"] / 1e6) == 608
    assert int(counts["xar-h"] / 1e8) == 11


# ---------------------------------------------------------------------------------------------- training pass
def test_all_cells_pass_is_block_causal(model):
    tokens = torch.randn(2, 64, 4, generator=gen(3))
    labels, times = torch.tensor([3, 4]), torch.rand(2, 4, generator=gen(4))
    before = model.run_cells(tokens, conditions_at(model, labels, times))
    for k in range(4):
        changed, later = tokens.clone(), times.clone()
        changed[:, 16 * k:16 * (k + 1)] += 1.0
        later[:, k] = 1 - later[:, k]
        for inputs, cell_times in ((changed, times), (tokens, later)):
            after = model.run_cells(inputs, conditions_at(model, labels, cell_times))
            assert torch.equal(after[:, :16 * k], before[:, :16 * k])  # earlier cells never see it
            assert not torch.allclose(after[:, 16 * k:16 * (k + 1)], before[:, 16 * k:16 * (k + 1)])
            if k < 3:
                assert not torch.allclose(after[:, 16 * (k + 1):], before[:, 16 * (k + 1):])


def test_training_loss_puts_each_cell_on_its_own_point_of_the_path(model):
    """Cell k's input is (1 - t_k) x + t_k eps_k and its target eps_k - x: with every cell at t = 0 the model sees
    the clean latent, and the loss is the error against each cell's own noise."""
    latents = torch.randn(2, 4, 8, 8, generator=gen(5))
    labels = torch.tensor([1, 7])
    noise = torch.randn(2, 4, 16, 4, generator=gen(6))
    out = model(latents, labels, drop_mask=torch.zeros(2, dtype=torch.bool), cell_times=torch.zeros(2, 4),
                cell_noise=noise)
    v = model.run_cells(to_cells(latents, 4), conditions_at(model, labels, torch.zeros(2, 4)))
    target = noise.reshape(2, 64, 4) - to_cells(latents, 4)
    per_cell = (v - target).pow(2).reshape(2, 4, 64).mean(-1)
    torch.testing.assert_close(out.loss_per_scale, per_cell.mean(0))
    torch.testing.assert_close(out.loss, (v - target).pow(2).mean())


def test_training_draws_are_batch_first_and_labels_drop_only_in_training(model):
    latents = torch.randn(4, 4, 8, 8, generator=gen(7))
    labels = torch.tensor([0, 1, 2, 3])
    draws = model.draw_randomness(4, generator=gen(8))
    assert {k: tuple(v.shape) for k, v in draws.items()} == {"drop_mask": (4,), "cell_times": (4, 4),
                                                             "cell_noise": (4, 4, 16, 4)}
    assert bool(((draws["cell_times"] > 0) & (draws["cell_times"] < 1)).all())
    model.train()
    try:
        whole = model(latents, labels, generator=gen(8)).loss
        assert torch.equal(whole, model(latents, labels, **draws).loss)  # the generator's draws, in that order
        halves = [model(latents[rows], labels[rows], **{k: v[rows] for k, v in draws.items()}).loss
                  for rows in (slice(0, 2), slice(2, 4))]
        torch.testing.assert_close(whole, sum(halves) / 2)  # a trainer's split of the rows changes nothing
        dropped = {**draws, "drop_mask": torch.ones(4, dtype=torch.bool)}
        others = torch.tensor([9, 8, 7, 6])
        assert torch.equal(model(latents, labels, **dropped).loss, model(latents, others, **dropped).loss)
    finally:
        model.eval()
    assert not torch.equal(model(latents, labels, **dropped).loss, model(latents, others, **dropped).loss)


def test_a_few_optimizer_steps_lower_the_loss():
    model = small_model(1)
    model.train()
    latents = torch.randn(8, 4, 8, 8, generator=gen(9))
    labels = torch.arange(8) % 10
    draws = model.draw_randomness(8, generator=gen(10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = model(latents, labels, **draws).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------- sampling
def recomputed_sample(model, labels, noise, *, solver, steps, guidance_scale, cfg_schedule, interval=(0.0, 1.0)):
    """Cell by cell with no KV cache: every velocity is one block-causal pass over the clean cells before it (at
    t = 0) and the noisy cell, for the labels and, where guidance applies (inside ``interval``), for the null
    class; the SDE and Euler written out here. steps: one count, or one per cell."""
    batch, cells = labels.shape[0], model.config.num_cells
    null = torch.full_like(labels, model.null_class)
    done = []
    for k in range(cells):
        ramp = k / (cells - 1) if cfg_schedule == "linear" else 1.0
        weight = 1 + (guidance_scale - 1) * ramp
        count = steps[k] if isinstance(steps, tuple) else steps

        def velocity(x, t):
            tokens = torch.cat([*done, x.float()], dim=1)
            times = torch.cat([torch.zeros(batch, k), torch.full((batch, 1), float(t))], dim=1)
            v_cond = model.run_cells(tokens, conditions_at(model, labels, times))[:, -16:].double()
            if weight == 1 or not interval[0] <= float(t) <= interval[1]:
                return v_cond
            v_null = model.run_cells(tokens, conditions_at(model, null, times))[:, -16:].double()
            return v_null + weight * (v_cond - v_null)

        x = noise[k][:, 0].double()
        if solver == "sde":
            grid = torch.cat([torch.linspace(1, 0.04, count, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
            for i in range(count - 1):
                t, dt = grid[i], grid[i + 1] - grid[i]
                x = x + ((2 - t) * velocity(x, t) + x) * dt + torch.sqrt(2 * t * -dt) * noise[k][:, i + 1].double()
            x = x - 0.04 * ((2 - 0.04) * velocity(x, grid[-2]) + x)
        else:
            grid = torch.linspace(1, 0, count + 1, dtype=torch.float64)
            for t, t_next in zip(grid[:-1], grid[1:]):
                x = x + (t_next - t) * velocity(x, t)
        done.append(x.float())
    return from_cells(torch.cat(done, dim=1), 8, 4)


@pytest.mark.parametrize("solver, cfg_schedule", [("sde", "linear"), ("euler", "linear"), ("sde", "constant")])
def test_cached_sampling_equals_the_recompute_without_cache(model, solver, cfg_schedule):
    labels = torch.tensor([2, 5, 9])
    options = model.sampling_options(solver=solver, steps=6, guidance_scale=3.0, cfg_schedule=cfg_schedule)
    noise = model.noise_from_seeds([11, 12, 13], options)
    assert [tuple(n.shape) for n in noise] == [(3, 6 if solver == "sde" else 1, 16, 4)] * 4
    out = model.sample_with_stats(labels, sampling=options, noise=noise)
    want = recomputed_sample(model, labels, noise, solver=solver, steps=6, guidance_scale=3.0,
                             cfg_schedule=cfg_schedule)
    torch.testing.assert_close(out.latents, want, atol=1e-5, rtol=1e-5)
    assert out.nfe_per_scale == [6] * 4
    # The null rows run where guidance uses them: not in the first cell of the linear ramp (weight 1).
    doubled_cells = 3 if cfg_schedule == "linear" else 4
    assert out.head_rows == 6 * 16 * 3 * (4 + doubled_cells)


def test_guidance_ramps_over_the_cells(model):
    labels = torch.tensor([4, 8])
    noise = model.noise_from_seeds([1, 2], model.sampling_options(steps=5))
    plain = to_cells(model.sample(labels, noise=noise, steps=5, guidance_scale=1.0), 4)
    linear = to_cells(model.sample(labels, noise=noise, steps=5, guidance_scale=4.0), 4)
    constant = to_cells(model.sample(labels, noise=noise, steps=5, guidance_scale=4.0, cfg_schedule="constant"), 4)
    assert torch.equal(linear[:, :16], plain[:, :16])  # weight 1 in the first cell
    assert not torch.allclose(linear[:, 16:32], plain[:, 16:32])
    assert not torch.allclose(constant[:, :16], plain[:, :16])


def test_each_image_depends_on_its_own_seed_only(model):
    one = model.sample([3], noise=model.noise_from_seeds([7]))
    both = model.sample([5, 3], noise=model.noise_from_seeds([4, 7]))
    torch.testing.assert_close(both[1:], one, atol=1e-6, rtol=1e-5)
    seeded = model.sample([3], generator=gen(0))
    assert torch.equal(seeded, model.sample([3], generator=gen(0)))


def test_a_stepper_taking_over_feeds_the_earlier_cells_as_context(model):
    """Collaborative decoding: the refiner's stepper catches up on the drafted cells through the same feed."""
    labels = [1, 6]
    noise = model.noise_from_seeds([3, 4])
    alone = model.sample(labels, noise=noise)
    for draft_scales in (1, 3):
        out = collaborative_sample(model, model, labels, draft_scales=draft_scales, noise=noise)
        torch.testing.assert_close(out.sample.latents, alone, atol=1e-6, rtol=1e-5)


def gaussian_velocity(mean: float, std: float):
    """The exact velocity of data ~ N(mean, std^2) per coordinate on the straight path (t = 1 noise): x_t has
    mean (1 - t) mean and variance (1 - t)^2 std^2 + t^2, and v = E[eps - x | x_t] is affine in x_t."""
    def velocity(x, t):
        t = t.reshape(-1)[0].double()
        var = (1 - t) ** 2 * std ** 2 + t ** 2
        centred = x.double() - (1 - t) * mean
        return (t - (1 - t) * std ** 2) / var * centred - mean
    return velocity


def test_sde_and_ode_reach_the_data_law_of_a_known_flow():
    """On an exact velocity, the ODE ends at the data law; the SDE follows the marginals down to t = 0.04, then
    its last step, the drift alone, is affine: the mean lands on the data mean and the std is the one computed
    here, 1% below the data's."""
    mean, std, e = 1.0, 0.5, 0.04
    g = gen(0)
    draws = {}

    def normal(i):
        if i not in draws:
            draws[i] = torch.randn(64, 64, 16, generator=g)
        return draws[i]

    velocity = gaussian_velocity(mean, std)
    ode, _ = integrate(velocity, normal(0), SolveOptions(solver="rk4", steps=50, schedule="uniform", atol=1e-5,
                                                         rtol=1e-5))
    assert abs(ode.mean().item() - mean) < 0.01 and abs(ode.std().item() - std) / std < 0.01
    sde, calls = euler_maruyama(velocity, normal, 300)
    assert calls == 300
    var_e = (1 - e) ** 2 * std ** 2 + e ** 2
    slope = (e - (1 - e) * std ** 2) / var_e
    want_std = (1 - e * ((2 - e) * slope + 1)) * math.sqrt(var_e)
    assert abs(sde.mean().item() - mean) < 0.01
    assert abs(sde.std().item() - want_std) / want_std < 0.01
    assert abs(want_std - std) / std > 0.009  # the released last step is not the ODE's end


# ---------------------------------------------------------------------------------------------- files and input
def test_pipeline_saves_and_loads_through_the_registry(tmp_path, model):
    pipe = XARPipeline(model, tiny_vae(0))
    pipe.save_pretrained(tmp_path / "release")
    assert json.loads((tmp_path / "release" / "config.json").read_text())["model_type"] == "xar"
    loaded = load_pipeline(tmp_path / "release")
    assert isinstance(loaded, XARPipeline) and loaded.model.config == model.config
    assert isinstance(load_model(tmp_path / "release"), XAR)
    images = pipe([1, 2], generator=gen(5), output_type="pt")
    assert images.shape == (2, 3, 16, 16)
    assert torch.equal(loaded([1, 2], generator=gen(5), output_type="pt"), images)


def test_bad_options_and_inputs_name_the_argument(model):
    with pytest.raises(ValueError, match="solver"):
        XARSampling(solver="heun")
    with pytest.raises(ValueError, match="steps"):
        XARSampling(steps=1)
    with pytest.raises(ValueError, match="steps"):
        XARSampling(solver="dopri5", steps=10)
    assert XARSampling(steps=10).replace(solver="dopri5").steps is None
    with pytest.raises(ValueError, match="cfg_schedule"):
        XARSampling(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="temperature is not a sampling option"):
        model.sample([1], temperature=0.5)
    with pytest.raises(ValueError, match="cell_side"):
        XARConfig(latent_side=10, cell_side=4)
    with pytest.raises(ValueError, match="num_heads"):
        XARConfig(width=72, num_heads=12)  # 6 channels per head do not split into row and column RoPE pairs
    with pytest.raises(ValueError, match="noise"):
        model.sample([1], noise=model.noise_from_seeds([1], model.sampling_options(solver="euler")))
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(2, 4, 16, 16), [1, 2])
    with pytest.raises(ValueError, match="cell_times"):
        model(torch.randn(2, 4, 8, 8), [1, 2], cell_times=torch.rand(2, 3))
    with pytest.raises(ValueError, match="class_labels"):
        model.sample([10])
