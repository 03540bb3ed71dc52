"""The sampling benchmark times FlowAR, xAR, VAR and FlexVAR presets side by side and reports self-consistent
numbers; its run beside the authors' sampler (tools.bench_reference sample) reuses it."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import fake_flowar_checkout
from eval.bench_sample import (axis_options, build_parser, flow_axes, main, matching_tokenizer, measure,
                               settings_from_args)
from flowar import VAR, XAR, FlexVAR, get_flexvar_preset, get_var_preset, get_xar_preset
from tools import bench_reference
from vae.flexvq import FlexVQVAE
from vae.msvq import MultiScaleVQVAE

# What main() hands measure() without sampling flags: every option None, i.e. each preset's saved defaults.
FLOWAR_OPTIONS = {"guidance_scale": None, "steps": None, "solver": None, "schedule": None, "guidance_interval": None,
                  "var_cfg": None, "top_k": None, "top_p": None}


TOKEN_FAMILIES = {"var-tiny": (VAR, get_var_preset, MultiScaleVQVAE), "flexvar-tiny": (FlexVAR, get_flexvar_preset, FlexVQVAE)}


@pytest.mark.parametrize("preset, batch", [("var-tiny", 3), ("flexvar-tiny", 2)])
def test_token_families_rows_count_the_flops_of_one_sampling_call(preset, batch):
    """VAR's and FlexVAR's rows: the FLOPs of the timed call, one pass per scale and no head evaluations; with
    --decode the tokenizer's decoder adds to the cost and the parameters."""
    row = measure(preset, batch, "fp32", "cpu", FLOWAR_OPTIONS, False, 0, 1)
    family, get_config, tokenizer_class = TOKEN_FAMILIES[preset]
    torch.manual_seed(0)
    model = family(get_config(preset)).eval()
    tokenizer = tokenizer_class(matching_tokenizer(preset)).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.sample(torch.arange(batch), tokenizer=tokenizer, generator=torch.Generator().manual_seed(0))
    assert row["GFLOP/image"] * 1e9 * batch == pytest.approx(counter.get_total_flops(), rel=1e-6)
    assert row["passes"] == len(model.config.scales) and (row["head NFE"], row["solver"]) == ("-", "-")
    assert row["images/s"] > 0 and row["params (M)"] == pytest.approx(
        sum(p.numel() for p in model.parameters()) / 1e6)
    decoded = measure(preset, batch, "fp32", "cpu", FLOWAR_OPTIONS, True, 0, 1)
    assert decoded["GFLOP/image"] > row["GFLOP/image"] and decoded["params (M)"] > row["params (M)"]


def test_decoding_adds_the_decoder_to_the_cost():
    bare = measure("var-tiny", 2, "fp32", "cpu", FLOWAR_OPTIONS, False, 0, 1)
    decoded = measure("var-tiny", 2, "fp32", "cpu", FLOWAR_OPTIONS, True, 0, 1)
    assert decoded["GFLOP/image"] > bare["GFLOP/image"] and decoded["params (M)"] > bare["params (M)"]


def test_guidance_off_halves_the_var_transformer_work():
    guided = measure("var-tiny", 2, "fp32", "cpu", {**FLOWAR_OPTIONS, "var_cfg": 1.5}, False, 0, 1)
    unguided = measure("var-tiny", 2, "fp32", "cpu", {**FLOWAR_OPTIONS, "var_cfg": 0.0}, False, 0, 1)
    assert 0.4 < unguided["GFLOP/image"] / guided["GFLOP/image"] < 0.6
    # guidance_scale 1 is the same unguided run in the shared convention
    one = measure("var-tiny", 2, "fp32", "cpu", {**FLOWAR_OPTIONS, "guidance_scale": 1.0}, False, 0, 1)
    assert one["GFLOP/image"] == pytest.approx(unguided["GFLOP/image"])


def test_flowar_options_reach_the_sampler():
    """4 midpoint steps (2 evaluations each) at each of flowar-tiny's 4 scales; its defaults would give 40."""
    row = measure("flowar-tiny", 2, "fp32", "cpu", {**FLOWAR_OPTIONS, "steps": 4, "solver": "midpoint"}, False, 0, 1)
    assert row["head NFE"] == 4 * 2 * 4


@pytest.mark.parametrize("solver, per_step", [("sde", 1), ("euler", 1), ("midpoint", 2)])
def test_xar_row_counts_its_evaluations_and_the_flops_of_one_call(solver, per_step):
    """xar-tiny: four cells of 3 steps; every evaluation is a transformer pass, and so is each clean cell's feed."""
    row = measure("xar-tiny", 2, "fp32", "cpu", {**FLOWAR_OPTIONS, "steps": 3, "solver": solver}, False, 0, 1)
    assert row["head NFE"] == 4 * 3 * per_step and row["passes"] == row["head NFE"] + 3
    assert (row["solver"], row["steps"]) == (solver, "3")
    torch.manual_seed(0)
    model = XAR(get_xar_preset("xar-tiny")).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = model.sample_with_stats(torch.tensor([0, 1]), steps=3, solver=solver,
                                      generator=torch.Generator().manual_seed(0))
    assert row["GFLOP/image"] * 1e9 * 2 == pytest.approx(counter.get_total_flops(), rel=1e-6)
    assert row["head rows/image"] == out.head_rows / 2
    assert row["params (M)"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)


def test_released_xar_and_flexvar_presets_pair_with_their_decoders():
    config = matching_tokenizer("flexvar-d16")
    assert (config.codebook_size, config.code_dim) == (8912, 32)
    with pytest.raises(ValueError, match="KL-16"):  # xar-tiny's latents have 4 channels
        measure("xar-tiny", 1, "fp32", "cpu", FLOWAR_OPTIONS, True, 0, 1)


def test_released_var_presets_pair_with_the_released_tokenizer():
    config = matching_tokenizer("var-d16")
    assert (config.codebook_size, config.code_dim, config.scales[-1]) == (4096, 32, 16)


def test_cli_puts_flowar_and_var_in_one_table(capsys):
    # Two rows, each its own spawned process (the precision list is crossed the same way; test_bench_train
    # covers a list of two precisions).
    assert main(["--preset", "flowar-tiny,var-tiny", "--batch", "2", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "-tiny |" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| flowar-tiny", "| var-tiny"]
    assert all("| bf16 |" in row for row in rows)
    assert "relative to flowar-tiny bf16" in out and "var-tiny bf16" in out.splitlines()[-1]


def test_solvers_and_steps_are_axes_of_the_flow_families_only():
    """xAR crosses its SDE and Euler rows with the step counts; FlexVAR has neither, so it runs once."""
    p = build_parser()
    s = settings_from_args(p, p.parse_args(["--preset", "xar-tiny,flexvar-tiny", "--solver", "sde,euler",
                                            "--steps", "3,2"]))
    rows = [(preset, {**s.options, **axis_options(steps, solver)}) for preset in s.presets
            for solver, steps in flow_axes(s, preset)]
    assert [(preset, options.get("solver"), options.get("steps")) for preset, options in rows] == [
        ("xar-tiny", "sde", 3), ("xar-tiny", "sde", 2), ("xar-tiny", "euler", 3), ("xar-tiny", "euler", 2),
        ("flexvar-tiny", None, None)]


@pytest.mark.parametrize("argv, message", [
    (["--preset", "var-d99"], "--preset"),
    (["--preset", "flowar-tiny", "--solver", "sde"], "--solver"),  # xAR's solver
    (["--preset", "xar-tiny", "--solver", "flow-map"], "--solver"),  # FlowAR's
    (["--preset", "xar-tiny", "--solver", "euler,bogus"], "--solver"),
    (["--preset", "xar-tiny", "--steps", "4/2"], "--steps"),  # one count for every cell
    (["--preset", "xar-tiny", "--steps", "1"], "--steps"),  # the SDE needs 2
    (["--preset", "flowar-tiny", "--steps", "4/2"], "--steps"),  # a count per scale, of which it has 4
    (["--preset", ","], "--preset"),
    (["--precision", "fp16"], "--precision"),
    (["--batch", "0"], "--batch"),
    (["--repeats", "0"], "--repeats"),
    (["--steps", "4/x"], "--steps"),
    (["--batch", "2,a"], "--batch"),
    (["--reference", "."], "--reference"),  # the authors' code is timed by tools.bench_reference only
    (["--small"], "--small"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_reference_mode_times_the_authors_sampler_against_ours_on_the_same_weights(tmp_path, capsys):
    """A stand-in checkout (its sampler is ours, so fp32 at the same settings must match its latents once the
    harness hands its initial noise over); fewer steps must show as fewer head evaluations and a gap."""
    checkout = fake_flowar_checkout(tmp_path / "FlowAR")
    assert bench_reference.main(["sample", "--preset", "flowar-s", "--batch", "1", "--small", "--reference", checkout,
                                 "--repeats", "1", "--precision", "fp32,bf16", "--steps", "25,4/2/2/2/2"]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| authors") or line.startswith("| ours")]
    header = [cell.strip() for cell in next(line for line in out.splitlines() if line.startswith("| impl")).strip("|").split("|")]
    table = [dict(zip(header, row)) for row in rows]
    assert [(r["implementation"], r["precision"], r["steps"]) for r in table] == [
        ("authors", "fp32", "25"), ("ours", "fp32", "25"), ("ours", "bf16", "25"),
        ("ours", "fp32", "4/2/2/2/2"), ("ours", "bf16", "4/2/2/2/2")]
    # theirs at the preset's 25; the flowar grid of n steps has n // 2 + n // 2 + 1 points: 25 -> 24 intervals,
    # 4 -> 4, 2 -> 2; five scales
    assert [int(r["head NFE"]) for r in table] == [120, 120, 120, 12, 12]
    assert float(table[1]["vs authors' latents"]) < 1e-5
    assert 1e-5 < float(table[2]["vs authors' latents"]) < 0.2  # bf16: close, not equal
    assert float(table[3]["vs authors' latents"]) > 1e-3
    assert "speed against the authors' fp32: fp32 25 steps" in out and "% peak" in out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "flowar-s,var-d16", "--reference", "."], "--reference"),
    (["--preset", "flowar-tiny", "--reference", "."], "--reference"),
    (["--preset", "flowar-s", "--reference", ".", "--decode"], "--decode"),
    (["--preset", "flowar-s"], "--reference"),  # required
    (["--reference", ".", "--steps", "4/x"], "--steps"),
    (["--reference", ".", "--batch", "2,a"], "--batch"),
])
def test_bad_reference_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_reference.main(["sample", *argv])
    assert message in capsys.readouterr().err
