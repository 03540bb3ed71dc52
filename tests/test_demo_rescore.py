"""train.demo --rescore: step 5 again on an earlier run's release, with sampling overrides, as step 5 scores."""

import json

import pytest
import torch

from conftest import tiny_flowar_pipeline
from eval.quality import DigitClassifier, DigitScorer, sample_digits, save_classifier
from train import demo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo output folder as train.demo leaves it: results.json, the release and the digit classifier (random
    weights: the scores only have to be reproducible, not good)."""
    folder = tmp_path_factory.mktemp("run")
    tiny_flowar_pipeline(seed=3).save_pretrained(folder / "flowar-release")
    torch.manual_seed(0)
    save_classifier(DigitClassifier(), folder / "digit-classifier", heldout_accuracy=0.1)
    results = {"model": "flowar", "seed": 4, "steps": 400, "overrides": ["model.head_depth=2"],
               "release": str(folder / "moved-away"), "class_consistency": 0.5, "minutes": 9.0, "fid": 40.0,
               "fid_minutes": 2.0}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def expected_scores(run, per_class, seed=4 + 1, **sampling):
    """The score by its definition: the run's seed + 1 (or ``seed``), the run's classifier."""
    from flowar import load_pipeline

    pipe = load_pipeline(run / "flowar-release")
    images, labels = sample_digits(pipe, per_class=per_class, seed=seed, **sampling)
    return DigitScorer.load_or_train(run / "digit-classifier", progress=False).score(images, labels)


def test_rescoring_is_step_5_with_the_runs_seed_and_classifier(run, tmp_path):
    before = (run / "results.json").read_text()
    assert demo.main(["--rescore", str(run), "--out", str(tmp_path / "same"), "--per-class", "2"]) == 0
    assert demo.main(["--rescore", str(run), "--out", str(tmp_path / "steps"), "--per-class", "2",
                      "--sample", "steps=4", "--sample", 'guidance_interval=[0.0, 0.8]']) == 0
    same = json.loads((tmp_path / "same" / "results.json").read_text())
    steps = json.loads((tmp_path / "steps" / "results.json").read_text())
    for got, sampling in [(same, {}), (steps, {"steps": 4, "guidance_interval": [0.0, 0.8]})]:
        report = expected_scores(run, 2, **sampling)
        assert got["num_samples"] == 20 and got["per_digit"] == report.per_digit
        assert got["class_consistency"] == report.class_consistency
        assert got["frechet_distance"] == pytest.approx(report.frechet_distance, rel=1e-9)
        # what the row is: the run's model, seed and training; the run's own score and time are not carried
        assert got["seed"] == 4 and got["overrides"] == ["model.head_depth=2"] and "minutes" not in got
        assert "fid" not in got and "fid_minutes" not in got  # rescored without --fid: no stale FID or its time
        assert got["rescored_from"] == str(run) and got["release"] == str(run / "flowar-release")
    assert same["sampling_overrides"] == [] and steps["sampling_overrides"] == ["steps=4", "guidance_interval=[0.0, 0.8]"]
    # the cost columns are the rescored settings', not the run's: 10 saved steps, then 4, at each of 4 scales
    assert same["head_evaluations"] == 4 * 10 and steps["head_evaluations"] == 4 * 4
    assert same["frechet_distance"] != steps["frechet_distance"]  # the override reached the sampler
    assert (run / "results.json").read_text() == before


def test_sample_seeds_score_each_seed_and_write_their_mean_and_sd(run, tmp_path):
    assert demo.main(["--rescore", str(run), "--out", str(tmp_path / "seeds"), "--per-class", "2",
                      "--sample-seeds", "5,9"]) == 0
    got = json.loads((tmp_path / "seeds" / "results.json").read_text())
    reports = [expected_scores(run, 2, seed=seed) for seed in (5, 9)]
    assert [row["sample_seed"] for row in got["by_sample_seed"]] == [5, 9]
    for row, report in zip(got["by_sample_seed"], reports):
        assert row["frechet_distance"] == pytest.approx(report.frechet_distance, rel=1e-9)
        assert row["per_digit"] == report.per_digit
    distances = [report.frechet_distance for report in reports]
    assert distances[0] != distances[1]  # the second seed drew other samples
    assert got["frechet_distance"] == pytest.approx(sum(distances) / 2, rel=1e-9)
    assert got["frechet_distance_sd"] == pytest.approx(abs(distances[0] - distances[1]) / 2 ** 0.5, rel=1e-9)
    assert got["num_samples"] == 20


def test_sampling_precision_bf16_scores_samples_drawn_under_autocast(run, tmp_path):
    assert demo.main(["--rescore", str(run), "--out", str(tmp_path / "bf16"), "--per-class", "2",
                      "--sampling-precision", "bf16"]) == 0
    got = json.loads((tmp_path / "bf16" / "results.json").read_text())
    report = expected_scores(run, 2, autocast_dtype=torch.bfloat16)
    assert got["sampling_precision"] == "bf16"
    assert got["frechet_distance"] == pytest.approx(report.frechet_distance, rel=1e-9)
    assert got["frechet_distance"] != pytest.approx(expected_scores(run, 2).frechet_distance, rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--sample", "steps=20"], "--sample needs --rescore RUN"),
    (["--sample-seeds", "1,2"], "--sample-seeds needs --rescore RUN"),
    (["--sampling-precision", "bf16"], "--sampling-precision needs --rescore RUN"),
    (["--rescore", "{run}", "--sampling-precision", "fp16"], "--sampling-precision: invalid choice"),
    (["--rescore", "{run}", "--sample-seeds", "1,x"], "--sample-seeds takes comma-separated integers"),
    (["--rescore", "{run}", "--sample-seeds", "1,1"], "--sample-seeds takes distinct integers >= 0"),
    (["--rescore", "{run}", "--sample-seeds=-1"], "--sample-seeds takes distinct integers >= 0"),
    (["--rescore", "{run}", "--sample", "steps"], "--sample takes KEY=VALUE, got 'steps'"),
    (["--rescore", "{run}", "--sample", "no_such_option=1"], "--sample:"),
    (["--rescore", "{run}", "--sample", "steps=0"], "--sample:"),
    (["--rescore", "{run}", "--seed", "1"], "--rescore takes the run's seed"),
    (["--rescore", "{run}", "--set", "lr=1"], "--rescore takes the run's seed"),
    (["--rescore", "{run}", "--precision", "fp32"], "--precision do not apply"),
    (["--rescore", "{run}", "--per-class", "0"], "--rescore needs samples to score"),
    (["--rescore", "{nowhere}"], "not a demo output folder"),
])
def test_bad_rescores_exit_with_the_flag_named(run, argv, message, tmp_path, capsys):
    argv = [a.format(run=run, nowhere=tmp_path / "nowhere") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rescoring_into_the_run_itself_is_refused(run, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--rescore", str(run), "--out", str(run)])
    assert "does not overwrite the run's results" in capsys.readouterr().err
