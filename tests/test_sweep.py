"""The sampler sweep: the grid of configurations, the CSV (resumable), TensorBoard scalars and the plot."""

import csv

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eval.inception import FeatureNetwork
from eval.reference import write_images_npz
from eval.sweep import SweepPoint, main, parse_steps, sample_point, sweep_points
from conftest import tiny_flowar_pipeline
from tests.test_metrics import CountingNet


@pytest.fixture
def small_network(monkeypatch):
    """A 24-d stand-in for Inception: the sweep's bookkeeping is under test here, not the FID network
    (tests/test_metrics.py checks that), and 2048-d covariances cost seconds each on 2 cores."""
    network = FeatureNetwork(CountingNet(), convention="fid-helper", identity="sweep-stand-in", feature_dim=24)
    monkeypatch.setattr("eval.sweep.load_feature_network", lambda *args, **kwargs: network)
    monkeypatch.setattr("eval.sweep.default_cache_dir", lambda: None)  # nothing written to ~/.cache
    return network


def test_grid_crosses_every_option_and_adaptive_solvers_take_tolerances():
    points = sweep_points(["euler", "dopri5"], [2, 4], [1e-2, 1e-3, 1e-4], [1.0, 3.0], [(0.0, 1.0)], schedule="flowar")
    assert len(points) == 2 * 2 + 3 * 2
    assert SweepPoint("euler", "flowar", 4, 0.0, 3.0, (0.0, 1.0)) in points
    assert SweepPoint("dopri5", "flowar", 0, 1e-4, 1.0, (0.0, 1.0)) in points


@pytest.mark.parametrize("kwargs, name", [
    ({"solvers": ["heun"]}, "solvers"),
    ({"steps": [0]}, "steps"),
    ({"tolerances": [0.0]}, "tolerances"),
    ({"intervals": [(0.8, 0.2)]}, "guidance intervals"),
    ({"schedule": "cosine"}, "schedule"),
])
def test_bad_grids_name_the_option(kwargs, name):
    options = {"solvers": ["euler"], "steps": [2], "tolerances": [1e-3], "cfgs": [1.0], "intervals": [(0.0, 1.0)],
               "schedule": "flowar"}
    with pytest.raises(ValueError, match=name):
        sweep_points(**{**options, **kwargs})


def test_a_step_count_the_schedule_cannot_take_is_refused_before_sampling():
    with pytest.raises(ValueError, match="steps"):
        sweep_points(["euler"], [1, 4], [1e-3], [1.0], [(0.0, 1.0)], schedule="flowar")
    assert len(sweep_points(["euler"], [1, 4], [1e-3], [1.0], [(0.0, 1.0)], schedule="uniform")) == 2


def test_sweep_writes_csv_tensorboard_and_plot_and_resumes(tmp_path, capsys, small_network):
    tiny_flowar_pipeline().save_pretrained(tmp_path / "pipe")
    reference = tmp_path / "reference.npz"
    write_images_npz(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    argv = [str(tmp_path / "pipe"), "--out", str(tmp_path / "sweep"), "--solvers", "euler,midpoint",
            "--steps", "2,4", "--guidance-scale", "2", "--num-samples", "6", "--reference", str(reference),
            "--batch-size", "4"]
    assert main(argv) == 0
    with (tmp_path / "sweep" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["steps"]) for r in rows] == [("euler", "2"), ("euler", "4"), ("midpoint", "2"),
                                                         ("midpoint", "4")]
    assert {r["guidance_scale"] for r in rows} == {"2"} and "cfg" not in rows[0]
    # flowar-tiny has 4 scales; midpoint costs 2 evaluations per step, euler 1 (even step counts: the
    # flowar schedule has exactly `steps` intervals then).
    assert [float(r["nfe_per_image"]) for r in rows] == [8, 16, 16, 32]
    assert all(float(r["fid"]) > 0 and float(r["seconds_per_image"]) > 0 for r in rows)
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path / "sweep" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("fid/euler w=2 gi=0-1")] == [8, 16]

    # A rerun with one more step count samples only the new configurations.
    capsys.readouterr()
    rerun = [*argv]
    rerun[rerun.index("--steps") + 1] = "2,4,6"
    assert main(rerun) == 0
    printed = capsys.readouterr().out
    assert printed.count("steps   6") == 2 and "steps   2" not in printed
    with (tmp_path / "sweep" / "sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6


def test_per_scale_step_lists_parse_validate_and_count_their_evaluations(tmp_path, small_network):
    assert parse_steps("10,8/6/5/4") == [10, (8, 6, 5, 4)]
    with pytest.raises(ValueError, match="--steps takes integers"):
        parse_steps("8/x")
    with pytest.raises(ValueError, match="steps"):
        sweep_points(["euler"], [(4, 0, 2, 2)], [1e-3], [1.0], [(0.0, 1.0)], schedule="flowar")
    tiny_flowar_pipeline().save_pretrained(tmp_path / "pipe")
    reference = tmp_path / "reference.npz"
    write_images_npz(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    argv = [str(tmp_path / "pipe"), "--out", str(tmp_path / "sweep"), "--solvers", "euler", "--num-samples", "4",
            "--reference", str(reference), "--guidance-scale", "1"]
    assert main([*argv, "--steps", "4,6/4/2/2"]) == 0
    with (tmp_path / "sweep" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    # Euler: one evaluation per step, summed over flowar-tiny's 4 scales: 4 x 4 = 16 and 6 + 4 + 2 + 2 = 14.
    assert [(r["steps"], float(r["nfe_per_image"])) for r in rows] == [("4", 16.0), ("6/4/2/2", 14.0)]
    # A list that does not fit the model's 4 scales is refused before anything is sampled.
    assert main([*argv, "--out", str(tmp_path / "bad"), "--steps", "4/4/4"]) == 2
    assert not (tmp_path / "bad" / "sweep.csv").exists()


def test_a_reference_is_required_without_digits(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "reference is required" in capsys.readouterr().err


def test_precision_is_an_axis_that_changes_the_samples_and_other_layouts_are_refused(tmp_path, small_network, capsys):
    with pytest.raises(ValueError, match="precisions"):
        sweep_points(["euler"], [2], [1e-3], [1.0], [(0.0, 1.0)], schedule="flowar", precisions=["fp16"])
    pipe = tiny_flowar_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    reference = tmp_path / "reference.npz"
    write_images_npz(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    argv = [str(tmp_path / "pipe"), "--out", str(tmp_path / "sweep"), "--solvers", "euler", "--num-samples", "6",
            "--reference", str(reference), "--steps", "4", "--precision", "fp32,bf16"]
    assert main(argv) == 0
    with (tmp_path / "sweep" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    events = EventAccumulator(str(tmp_path / "sweep" / "tensorboard")).Reload()
    assert {"fid/euler w=3 gi=0-1", "fid/euler w=3 gi=0-1 bf16"} <= set(events.Tags()["scalars"])
    # the bf16 point really ran under autocast: same seed, different images
    points = sweep_points(["euler"], [4], [1e-3], [3.0], [(0.0, 1.0)], schedule="flowar", precisions=["fp32", "bf16"])
    labels = torch.arange(4) % pipe.model.config.num_classes
    fp32, _, _ = sample_point(pipe, points[0], labels, batch_size=4, seed=0)
    bf16, _, _ = sample_point(pipe, points[1], labels, batch_size=4, seed=0)
    assert fp32.shape == bf16.shape and not np.array_equal(fp32, bf16)
    # A rerun adds nothing; a sweep.csv of another layout (here without the precision column) is refused by
    # name rather than mixed with new rows.
    assert main(argv) == 0
    with (tmp_path / "sweep" / "sweep.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    with (tmp_path / "sweep" / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "precision"])
        writer.writeheader()
        writer.writerows([{k: v for k, v in r.items() if k != "precision"} for r in rows])
    assert main(argv) == 2
    assert "lacks the columns ['precision']" in capsys.readouterr().err


def test_flow_map_jumps_are_an_axis_and_an_ordinary_head_is_refused_before_sampling(tmp_path, capsys, small_network):
    """A flow-map head sweeps its jumps per scale like steps (one evaluation per jump); an ordinary head asked for
    flow-map jumps stops before the first sample, naming the solver."""
    reference = tmp_path / "reference.npz"
    write_images_npz(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    common = ["--solvers", "flow-map", "--steps", "1,2,3/2/1/1", "--schedule", "uniform", "--guidance-scale", "1,2",
              "--num-samples", "6",
              "--reference", str(reference), "--batch-size", "6"]
    tiny_flowar_pipeline(flow_map=True).save_pretrained(tmp_path / "student")
    assert main([str(tmp_path / "student"), "--out", str(tmp_path / "jumps"), *common]) == 0
    with (tmp_path / "jumps" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    # Guided jumps evaluate the head on the class and the null class in one batch: one evaluation each.
    assert [(r["solver"], r["guidance_scale"], r["steps"], float(r["nfe_per_image"])) for r in rows] == [
        ("flow-map", w, steps, nfe) for w in ("1", "2") for steps, nfe in (("1", 4), ("2", 8), ("3/2/1/1", 7))]
    tiny_flowar_pipeline().save_pretrained(tmp_path / "ordinary")
    capsys.readouterr()
    assert main([str(tmp_path / "ordinary"), "--out", str(tmp_path / "refused"), *common]) == 2
    assert "flow-map" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "sweep.csv").exists()


def test_scale_lists_are_an_axis_and_a_fixed_model_is_refused_before_sampling(tmp_path, capsys, small_network):
    """A flexible model sweeps lists of sides, a larger last side included; a model of fixed scales asked for
    another list stops before the first sample, naming positions='grid'."""
    reference = tmp_path / "reference.npz"
    write_images_npz(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    common = ["--solvers", "euler", "--steps", "2", "--scales", "1/4/8,1/2/3/4/6/8,1/2/4/8/12,1/2/4/8x12", "--num-samples", "4",
              "--reference", str(reference), "--batch-size", "4"]
    tiny_flowar_pipeline(positions="grid", scale_lists="random").save_pretrained(tmp_path / "flexible")
    assert main([str(tmp_path / "flexible"), "--out", str(tmp_path / "lists"), *common]) == 0
    with (tmp_path / "lists" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    # Guided Euler, 2 steps per scale: one evaluation per step and scale.
    assert [(r["scales"], float(r["nfe_per_image"])) for r in rows] == [
        ("1/4/8", 6), ("1/2/3/4/6/8", 12), ("1/2/4/8/12", 10), ("1/2/4/8x12", 8)]
    tiny_flowar_pipeline().save_pretrained(tmp_path / "fixed")
    capsys.readouterr()
    assert main([str(tmp_path / "fixed"), "--out", str(tmp_path / "refused"), *common]) == 2
    assert "positions='grid'" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "sweep.csv").exists()
    with pytest.raises(ValueError, match="--scales"):
        sweep_points(["euler"], [2], [1e-3], [1.0], [(0.0, 1.0)], schedule="uniform", scale_lists=[(1, 8, 4)])
