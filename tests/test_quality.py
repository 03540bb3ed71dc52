"""The demo's quality scorer: input handling, a briefly trained classifier, scoring, save/load."""

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.quality import (
    DigitScorer,
    load_classifier,
    main,
    save_classifier,
    to_classifier_input,
    train_digit_classifier,
)
from train.data import MNISTDataset


@pytest.fixture(scope="module")
def trained():
    """One epoch is enough to separate a working scorer from a broken one, and keeps the test fast."""
    torch.set_num_threads(2)
    return train_digit_classifier(epochs=1, progress=False)


@pytest.fixture(scope="module")
def scorer(trained):
    return DigitScorer(*trained)


@pytest.fixture(scope="module")
def heldout():
    data = MNISTDataset(image_size=32, split="heldout")
    return data.images.numpy(), data.labels.numpy()


def test_inputs_in_every_layout_agree():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    nhwc = np.repeat(grey[..., None], 3, axis=-1)
    nchw = np.repeat(grey[:, None], 3, axis=1)
    expected = torch.from_numpy(grey).float().div(127.5).sub(1).unsqueeze(1)
    for layout in (grey, nhwc, nchw, torch.from_numpy(nhwc)):
        assert torch.allclose(to_classifier_input(layout), expected)


def test_other_sizes_are_resized_and_bad_inputs_named():
    assert to_classifier_input(np.zeros((2, 28, 28), np.uint8)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        to_classifier_input(np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_classifier_input(np.zeros((32, 32), np.uint8))


def test_classifier_learns_the_digits(trained):
    _, heldout_accuracy = trained
    assert heldout_accuracy > 0.85  # one epoch; the full 12 epochs reach 98%+


def test_real_digits_score_as_their_labels(scorer, heldout):
    images, labels = heldout
    report = scorer.score(images, labels)
    assert report.class_consistency == pytest.approx(scorer.heldout_accuracy, abs=1e-6)
    assert report.num_samples == 500 and len(report.per_digit) == 10
    assert report.frechet_distance == pytest.approx(frechet_by_scipy(scorer, images, training_digits()), rel=1e-4)
    wrong = scorer.score(images, (labels + 1) % 10)
    assert wrong.class_consistency < 0.15


def training_digits() -> np.ndarray:
    return MNISTDataset(image_size=32, split="train").images.numpy()


@torch.no_grad()
def features(scorer, images: np.ndarray) -> np.ndarray:
    """The classifier's 128-d penultimate features of uint8 (N, 32, 32) digits, in float64."""
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    return scorer.classifier.eval().embed(x).double().numpy()


def frechet_by_scipy(scorer, images: np.ndarray, reference) -> float:
    """The textbook Frechet distance, |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm.
    reference: uint8 images, or their features already computed (float64)."""
    a = features(scorer, images)
    b = reference if reference.dtype == np.float64 else features(scorer, reference)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def test_frechet_distance_separates_digits_from_noise(scorer, heldout):
    images, labels = heldout
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    real = scorer.score(images, labels).frechet_distance
    fake = scorer.score(noise, labels).frechet_distance
    assert fake > 10 * real
    assert fake == pytest.approx(frechet_by_scipy(scorer, noise, training_digits()), rel=1e-4)


def test_frechet_distance_is_zero_for_the_reference_and_grows_with_a_shift(scorer):
    train = training_digits()
    labels = MNISTDataset(image_size=32, split="train").labels.numpy()
    # The reference itself: the same Gaussian, distance 0 up to rounding (the heldout floor is far above).
    same = scorer.score(train, labels)
    assert same.frechet_distance < 1e-6 * same.real_heldout_frechet + 1e-6
    # Brightening the background moves the features away, further for a larger shift.
    subset = np.arange(0, len(train), 9)  # 500 digits
    reference = features(scorer, train)  # once, for the three shifts
    distances = []
    for shift in (0, 40, 120):
        shifted = np.clip(train[subset].astype(int) + shift, 0, 255).astype(np.uint8)
        distance = scorer.score(shifted, labels[subset]).frechet_distance
        assert distance == pytest.approx(frechet_by_scipy(scorer, shifted, reference), rel=1e-4)
        distances.append(distance)
    assert distances[0] < distances[1] < distances[2]


def test_per_digit_consistency_counts_each_digit(scorer, heldout):
    images, labels = heldout
    only_ones = labels == 1
    report = scorer.score(images[only_ones], labels[only_ones])
    assert np.isnan(report.per_digit[0]) and report.per_digit[1] == pytest.approx(report.class_consistency)


def test_bad_labels_are_named(scorer, heldout):
    images, labels = heldout
    with pytest.raises(ValueError, match="one entry per image"):
        scorer.score(images, labels[:-1])
    with pytest.raises(ValueError, match="digits 0..9"):
        scorer.score(images, labels + 10)


def test_save_load_round_trip_and_cli(tmp_path, trained, heldout):
    classifier, heldout_accuracy = trained
    save_classifier(classifier, tmp_path / "clf", heldout_accuracy=heldout_accuracy)
    loaded, accuracy = load_classifier(tmp_path / "clf")
    assert accuracy == heldout_accuracy
    x = to_classifier_input(heldout[0][:16])
    assert torch.equal(loaded(x), classifier.eval()(x))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"kind": "vae"}')
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a saved digit classifier"):
        load_classifier(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")
    np.savez(tmp_path / "samples.npz", arr_0=heldout[0][:50], labels=heldout[1][:50])
    assert main([str(tmp_path / "samples.npz"), "--classifier", str(tmp_path / "clf")]) == 0


def test_the_written_reference_is_the_training_digits(tmp_path, capsys):
    from eval.reference import read_images_npz

    assert main(["--write-reference", str(tmp_path / "ref.npz")]) == 0
    assert "4500 training digits" in capsys.readouterr().out
    train = MNISTDataset(image_size=32, split="train")
    images = read_images_npz(tmp_path / "ref.npz")
    assert images.shape == (4500, 32, 32, 3) and images.dtype == np.uint8
    for channel in range(3):  # grey repeated to RGB, pixel for pixel
        np.testing.assert_array_equal(images[..., channel], train.images.numpy())
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["labels"], train.labels.numpy())


def test_sampling_a_var_release_refuses_flowar_options(tmp_path, trained):
    from flowar import VAR, VARPipeline, get_var_preset
    from vae.msvq import MultiScaleVQVAE, get_msvq_preset

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(get_msvq_preset("mnist"))
    VARPipeline(VAR(get_var_preset("var-tiny", depth=1, width=32, num_heads=2)), tokenizer).save_pretrained(tmp_path / "var")
    save_classifier(trained[0], tmp_path / "clf", heldout_accuracy=trained[1])
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path / "var"), "--steps", "4", "--classifier", str(tmp_path / "clf")])
    assert main(["--pipeline", str(tmp_path / "var"), "--per-class", "1", "--guidance-scale", "1",
                 "--classifier", str(tmp_path / "clf")]) == 0


def test_training_digits_reference_is_written_once_in_the_cache(tmp_path):
    """The demo's FID and eval.sweep --digits share one reference file, written the first time only, so its
    Inception features are cached once."""
    from eval.quality import training_digits_reference

    path = training_digits_reference(tmp_path)
    assert path == tmp_path / "mnist-train-32.npz"
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (4500, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        assert sorted(set(npz["labels"].tolist())) == list(range(10))
    written = path.stat().st_mtime_ns
    assert training_digits_reference(tmp_path) == path and path.stat().st_mtime_ns == written


def test_the_classifier_is_trained_once_per_machine_and_copied_into_each_folder(tmp_path, monkeypatch, trained,
                                                                              heldout):
    """Every run scores with the same classifier: trained the first time into the cache, copied afterwards."""
    import eval.quality as quality

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    trainings = []

    def train_once(**kwargs):
        trainings.append(kwargs)
        return trained

    monkeypatch.setattr(quality, "train_digit_classifier", train_once)
    x = to_classifier_input(heldout[0][:16])
    expected = trained[0].eval()(x)
    first, accuracy = quality.load_or_train_classifier(tmp_path / "run-a", progress=False)
    assert len(trainings) == 1 and accuracy == trained[1] and torch.equal(first(x), expected)
    assert quality.shared_classifier_dir() == tmp_path / "cache" / "flowar" / "digit-classifier-v1"
    for folder in (quality.shared_classifier_dir(), tmp_path / "run-a"):
        assert torch.equal(load_classifier(folder)[0](x), expected)
    second, _ = quality.load_or_train_classifier(tmp_path / "run-b", progress=False)
    unsaved, _ = quality.load_or_train_classifier(None)
    assert len(trainings) == 1  # both from the cache
    assert torch.equal(second(x), expected) and torch.equal(unsaved(x), expected)
    assert torch.equal(load_classifier(tmp_path / "run-b")[0](x), expected)
    monkeypatch.setattr(quality, "CLASSIFIER_VERSION", 2)  # a new recipe is trained again, into its own folder
    quality.load_or_train_classifier(None)
    assert len(trainings) == 2 and (tmp_path / "cache" / "flowar" / "digit-classifier-v2" / "model.safetensors").is_file()
