"""tools.demo_table: seeds grouped by model, mean +- sd per column, and a missing results file named."""

import json

import pytest
import torch

from tools.demo_table import format_table, main, read_runs


def write_run(folder, model, seed, consistency, fid=None, overrides=None, sampling=None, fid_minutes=None,
              autoencoder=None, **extra):
    folder.mkdir(parents=True)
    run = {"model": model, "seed": seed, "head_evaluations": 40, "head_rows_per_image": 1600.0,
           "class_consistency": consistency, "per_digit": [consistency - 0.1] + [consistency] * 9,
           "frechet_distance": 90.0 + seed, "minutes": 5.0, "cores": 2, "torch_threads": 2, "torch": "x"}
    if fid is not None:
        run["fid"] = fid
    if fid_minutes is not None:
        run["fid_minutes"] = fid_minutes
    if overrides is not None:
        run["overrides"] = overrides
    if sampling is not None:
        run["sampling_overrides"] = sampling
    if autoencoder is not None:
        run["autoencoder_overrides"] = autoencoder
    run.update(extra)
    (folder / "results.json").write_text(json.dumps(run))
    return folder


def test_seeds_of_a_model_become_one_row_with_mean_and_sd(tmp_path):
    runs = [write_run(tmp_path / f"a{s}", "flowar", s, c, fid=f) for s, c, f in [(0, 0.95, 80.0), (1, 0.97, 84.0)]]
    runs.append(write_run(tmp_path / "b0", "var", 0, 0.9))
    groups = read_runs(runs)
    assert list(groups) == ["flowar", "var"] and len(groups["flowar"]) == 2
    table = format_table(groups).splitlines()
    flowar, var = table[2], table[3]
    # mean 96.0, sample sd of (95, 97) = 1.414; worst digit 85 and 87; FID 82 +- 2.83
    assert "| 0, 1 |" in flowar and "96.0 ± 1.4" in flowar and "86.0 ± 1.4" in flowar and "82.0 ± 2.8" in flowar
    assert "| 90.0 |" in var and var.rstrip(" |").endswith("5.0") and "| - |" in var  # one seed; no FID


def test_runs_with_other_overrides_are_other_rows(tmp_path):
    base = [write_run(tmp_path / f"base{s}", "flowar", s, 0.95, overrides=[]) for s in (0, 1)]
    lever = [write_run(tmp_path / f"lever{s}", "flowar", s, 0.97, overrides=["model.scale_weights=equal"]) for s in (0, 1)]
    old = write_run(tmp_path / "old", "flowar", 2, 0.96)  # written before results.json recorded overrides
    groups = read_runs([*base, *lever, old])
    assert list(groups) == ["flowar", "flowar model.scale_weights=equal"]
    assert [r["seed"] for r in groups["flowar"]] == [0, 1, 2] and len(groups["flowar model.scale_weights=equal"]) == 2


def test_runs_of_another_vae_are_other_rows(tmp_path):
    base = write_run(tmp_path / "base", "flowar", 0, 0.95, overrides=[], autoencoder=[])
    per_channel = [write_run(tmp_path / f"pc{s}", "flowar", s, 0.9, overrides=[], autoencoder=["latent_norm=per-channel"])
                   for s in (0, 1)]
    both = write_run(tmp_path / "both", "flowar", 0, 0.9, overrides=["model.context_noise=0.25"],
                     autoencoder=["kl_weight=0.0001"])
    groups = read_runs([base, *per_channel, both])
    assert list(groups) == ["flowar", "flowar vae latent_norm=per-channel",
                            "flowar vae kl_weight=0.0001 model.context_noise=0.25"]
    assert len(groups["flowar vae latent_norm=per-channel"]) == 2


def test_rescored_runs_are_rows_of_their_sampling_overrides(tmp_path):
    trained = write_run(tmp_path / "t", "flowar", 0, 0.95, overrides=["model.head_depth=2"])
    rescored = write_run(tmp_path / "r", "flowar", 0, 0.97, overrides=["model.head_depth=2"], sampling=["steps=20"])
    plain = write_run(tmp_path / "p", "flowar", 1, 0.96, sampling=[])
    groups = read_runs([trained, rescored, plain])
    assert list(groups) == ["flowar model.head_depth=2", "flowar model.head_depth=2 sampling steps=20", "flowar"]


def test_the_demos_own_minutes_leave_the_fid_out_where_its_time_was_recorded(tmp_path):
    timed = write_run(tmp_path / "t", "flowar", 0, 0.95, fid=40.0, fid_minutes=1.5)
    untimed = write_run(tmp_path / "u", "var", 0, 0.95, fid=40.0)  # written before fid_minutes was recorded
    table = format_table(read_runs([timed, untimed])).splitlines()
    assert table[0].endswith("| run minutes | of which distillation | demo minutes without FID |")
    assert table[2].endswith("| 5.0 | - | 3.5 |") and table[3].endswith("| 5.0 | - | - |")


def test_a_distilled_run_adds_its_teachers_demo_time_and_its_overrides_make_rows(tmp_path):
    """A few-step run that distilled an existing FlowAR run took 5 minutes (2 of them the FID, 2.5 the
    distillation) after the teacher's 8.5: the few-step demo is 11.5 minutes without the FID."""
    runs = [write_run(tmp_path / f"fs{s}", "flowar-fewstep", s, 0.95, fid=30.0, fid_minutes=2.0, teacher_minutes=8.5,
                      distill_minutes=2.5, distill_overrides=[]) for s in (0, 1)]
    longer = write_run(tmp_path / "long", "flowar-fewstep", 0, 0.96, fid_minutes=2.0, teacher_minutes=8.5,
                       distill_minutes=2.5, distill_overrides=["steps=600"])
    groups = read_runs([*runs, longer])
    assert list(groups) == ["flowar-fewstep", "flowar-fewstep distill steps=600"]
    assert format_table(groups).splitlines()[2].endswith("| 5.0 | 2.5 | 11.5 |")


def test_a_folder_without_results_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "holds no results.json" in capsys.readouterr().err


def test_time_samples_each_row_at_its_own_sampling(tmp_path, monkeypatch):
    """--time samples every row's release, a rescored row with its --sample overrides (JSON values parsed)."""
    from tools import demo_table

    calls = []

    class Recorder:
        def __init__(self, release):
            self.release = release

        def __call__(self, labels, **kwargs):
            calls.append((self.release, len(labels), {k: v for k, v in kwargs.items() if k not in ("output_type", "generator")}))

    monkeypatch.setattr("flowar.load_pipeline", Recorder)
    saved = write_run(tmp_path / "a", "flowar-fewstep", 0, 0.95, release="rel-a")
    rescored = write_run(tmp_path / "b", "flowar-fewstep", 0, 0.95, release="rel-a",
                         sampling=["steps=1", "solver=flow-map", "steps_list=[2,1]"])
    in_bf16 = write_run(tmp_path / "c", "flowar-fewstep", 0, 0.95, release="rel-a", sampling=["steps=1"],
                        sampling_precision="bf16")
    timing = demo_table.time_sampling(read_runs([saved, rescored, in_bf16]), repeats=2, batch=4)
    assert set(timing) == {"flowar-fewstep", "flowar-fewstep sampling steps=1 solver=flow-map steps_list=[2,1]",
                           "flowar-fewstep sampling steps=1 precision=bf16"}
    assert calls[:3] == [("rel-a", 4, {"autocast_dtype": None}),
                         ("rel-a", 4, {"steps": 1, "solver": "flow-map", "steps_list": [2, 1], "autocast_dtype": None}),
                         ("rel-a", 4, {"steps": 1, "autocast_dtype": torch.bfloat16})]
    assert len(calls) == 6  # two rounds, the rows taking turns
