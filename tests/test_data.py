"""train/data.py: image folders (classes, transforms, broken files), the bundled MNIST, build_dataset."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from train.data import (
    IMG_EXTENSIONS,
    ImageFolderDataset,
    MNISTDataset,
    build_dataset,
    center_crop,
    check_image_file,
    load_image,
    load_mnist_5k,
)


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def solid_image(w, h, rgb):
    return Image.new("RGB", (w, h), rgb)


@pytest.fixture
def class_folder(tmp_path):
    """root/{cat,dog,bird}: 2 + 1 + 3 images, with an upper-case extension, a nested folder, a non-image."""
    root = tmp_path / "data"
    for name, count in [("cat", 2), ("dog", 1), ("bird", 3)]:
        (root / name).mkdir(parents=True)
        for i in range(count):
            solid_image(40, 30, (10 * i, 50, 90)).save(root / name / f"{i}.png")
    (root / "bird" / "2.png").rename(root / "bird" / "2.PNG")
    (root / "dog" / "nested").mkdir()
    solid_image(30, 40, (1, 2, 3)).save(root / "dog" / "nested" / "deep.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()  # hidden folders are not classes
    return root


def test_classes_from_sorted_subfolders(class_folder):
    ds = ImageFolderDataset(class_folder, image_size=16)
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    assert ds.num_classes == 3
    assert len(ds) == 7  # 3 + 2 + (1 + 1 nested); the .txt is ignored
    by_label = {}
    for path, label in ds.samples:
        by_label.setdefault(label, []).append(path.split("/data/")[1])
    assert by_label == {
        0: ["bird/0.png", "bird/1.png", "bird/2.PNG"],
        1: ["cat/0.png", "cat/1.png"],
        2: ["dog/0.png", "dog/nested/deep.jpg"],
    }
    image, label = ds[0]
    assert label == 0 and image.shape == (3, 16, 16)


def test_unconditional_mode(class_folder):
    ds = ImageFolderDataset(class_folder, image_size=16, unconditional=True)
    assert ds.num_classes == 0 and ds.classes == [] and ds.class_to_idx == {}
    assert len(ds) == 7
    assert set(ds.targets) == {-1}
    labels = torch.cat([y for _, y in DataLoader(ds, batch_size=4)])
    assert labels.tolist() == [-1] * 7


def test_unconditional_takes_images_directly_in_root(tmp_path):
    for i in range(3):
        solid_image(20, 20, (i, i, i)).save(tmp_path / f"{i}.jpeg")
    assert len(ImageFolderDataset(tmp_path, image_size=8, unconditional=True)) == 3
    with pytest.raises(ValueError, match="unconditional=True"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_clear_errors(tmp_path, class_folder):
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolderDataset(tmp_path / "missing", image_size=16)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"root.*\.png"):
        ImageFolderDataset(tmp_path / "empty", image_size=16)
    for bad in (0, -3, 1.5, True, "256"):
        with pytest.raises(ValueError, match="image_size"):
            ImageFolderDataset(class_folder, image_size=bad)
    (class_folder / "zebra").mkdir()  # an empty class would take an id and never be trained
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderDataset(class_folder, image_size=16)


def test_extensions_are_case_insensitive():
    assert all(e == e.lower() and e.startswith(".") for e in IMG_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp"} <= set(IMG_EXTENSIONS)


@pytest.fixture
def noise_folder(tmp_path):
    root = tmp_path / "noise"
    (root / "x").mkdir(parents=True)
    noise_image(90, 60, seed=1).save(root / "x" / "a.png")  # landscape
    noise_image(60, 90, seed=2).save(root / "x" / "b.png")  # portrait
    return root


def windows(image, size):
    """Every size x size window of an (H, W, 3) uint8 array, and their mirror images."""
    h, w = image.shape[:2]
    out = []
    for top in range(h - size + 1):
        for left in range(w - size + 1):
            crop = image[top : top + size, left : left + size]
            out += [((top, left, False), crop), ((top, left, True), crop[:, ::-1])]
    return out


def as_uint8(t):
    return ((t + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_train_transform_shape_range_and_determinism(noise_folder):
    ds = ImageFolderDataset(noise_folder, image_size=32, seed=7)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5  # noise, smoothed by the resize
    again = ImageFolderDataset(noise_folder, image_size=32, seed=7)
    assert torch.equal(again[0][0], x) and torch.equal(ds[0][0], x)
    # Workers do not change the views: randomness is keyed by (seed, epoch, index).
    serial = torch.cat([b for b, _ in DataLoader(ds, batch_size=2)])
    parallel = torch.cat([b for b, _ in DataLoader(again, batch_size=1, num_workers=2)])
    assert torch.equal(serial, parallel)


def test_train_views_are_real_crops_and_flips_that_vary(noise_folder):
    # The resize is checked against PIL directly: short side int(1.125 * 32) = 36, bicubic.
    source = Image.open(noise_folder / "x" / "a.png").convert("RGB")  # 90 x 60
    resized = np.asarray(source.resize((54, 36), Image.BICUBIC))
    table = windows(resized, 32)
    seen = set()
    for seed in range(24):
        view = as_uint8(ImageFolderDataset(noise_folder, image_size=32, seed=seed)[0][0])
        matches = [key for key, crop in table if np.array_equal(crop, view)]
        assert len(matches) == 1, f"seed {seed}: the view is not a unique window of the resized image"
        seen.add(matches[0])
    assert len(seen) >= 12
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({left for _, left, _ in seen}) >= 6  # the long side gives 23 offsets


def test_set_epoch_changes_views_and_hflip_off_never_flips(noise_folder):
    ds = ImageFolderDataset(noise_folder, image_size=32, seed=3)
    first = ds[1][0]
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], first)
    ds.set_epoch(0)
    assert torch.equal(ds[1][0], first)

    source = Image.open(noise_folder / "x" / "a.png").convert("RGB")
    resized = np.asarray(source.resize((54, 36), Image.BICUBIC))
    unflipped = [crop for (_, _, flip), crop in windows(resized, 32) if not flip]
    for seed in range(12):
        view = as_uint8(ImageFolderDataset(noise_folder, image_size=32, seed=seed, hflip=False)[0][0])
        assert any(np.array_equal(c, view) for c in unflipped)



def test_each_index_gets_its_own_draw(tmp_path):
    (tmp_path / "x").mkdir()
    for i in range(8):
        noise_image(90, 60, seed=1).save(tmp_path / "x" / f"{i}.png")  # eight copies of one image
    ds = ImageFolderDataset(tmp_path, image_size=32, seed=0)
    views = {as_uint8(ds[i][0]).tobytes() for i in range(8)}
    assert len(views) >= 5

@pytest.mark.parametrize("w, h", [(300, 100), (100, 300), (1200, 400)])
def test_center_crop_keeps_the_center(w, h):
    # Three bands along the long side: red | green | blue. The center crop must be the green band.
    image = np.zeros((h, w, 3), dtype=np.uint8)
    long = max(w, h)
    for band, channel in enumerate((0, 1, 2)):
        sl = slice(band * long // 3, (band + 1) * long // 3)
        if w > h:
            image[:, sl, channel] = 255
        else:
            image[sl, :, channel] = 255
    out = np.asarray(center_crop(Image.fromarray(image), 32)).astype(int)
    assert out.shape == (32, 32, 3)
    inner = out[3:-3, 3:-3]  # bicubic may bleed a pixel or two at the band borders
    assert inner[..., 1].min() > 240 and inner[..., 0].max() < 15 and inner[..., 2].max() < 15


def test_eval_mode_is_deterministic_center_crop(noise_folder):
    a = ImageFolderDataset(noise_folder, image_size=32, train=False, seed=0)
    b = ImageFolderDataset(noise_folder, image_size=32, train=False, seed=99)
    b.set_epoch(5)
    source = Image.open(noise_folder / "x" / "b.png")
    expected = as_uint8(a[1][0])
    assert np.array_equal(expected, np.asarray(center_crop(source.convert("RGB"), 32)))
    assert torch.equal(a[1][0], b[1][0])


@pytest.fixture
def broken_folder(tmp_path):
    """Five good images (distinct colours) and two broken ones: random bytes named .png, a JPEG cut in half."""
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    colours = {}
    for cls, names in [("a", ["0.png", "2.png", "4.jpg"]), ("b", ["1.png", "3.png"])]:
        for name in names:
            rgb = (int(name[0]) * 50, 255 - int(name[0]) * 50, 128)
            solid_image(24, 24, rgb).save(root / cls / name, quality=100)
            colours[str(root / cls / name)] = (rgb, 0 if cls == "a" else 1)
    (root / "a" / "1_corrupt.png").write_bytes(np.random.default_rng(0).bytes(3000))
    noise_image(64, 64, seed=5).save(root / "b" / "2_trunc.jpg", quality=95)
    data = (root / "b" / "2_trunc.jpg").read_bytes()
    (root / "b" / "2_trunc.jpg").write_bytes(data[: len(data) // 2])
    bad = {str(root / "a" / "1_corrupt.png"), str(root / "b" / "2_trunc.jpg")}
    return root, colours, bad


def test_truncation_is_detected_not_padded(broken_folder):
    root, _, _ = broken_folder
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    trunc = root / "b" / "2_trunc.jpg"
    Image.open(trunc)  # the header is intact: only a full decode finds the damage
    assert "truncated" in check_image_file(trunc)
    assert check_image_file(root / "a" / "1_corrupt.png") is not None
    assert check_image_file(root / "a" / "0.png") is None


def test_load_refuses_when_truncated_loading_is_enabled(broken_folder, monkeypatch):
    root, _, _ = broken_folder
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(root / "a" / "0.png")


def good_image_of(tensor, colours):
    """(path, label) of the good solid image this (3, S, S) tensor shows, or None."""
    pixel = tuple(as_uint8(tensor)[8, 8].tolist())
    for path, (rgb, label) in colours.items():
        if max(abs(p - c) for p, c in zip(pixel, rgb)) <= 3:
            return path, label
    return None


def test_epoch_with_broken_files_yields_only_good_images(broken_folder):
    root, colours, bad = broken_folder
    ds = ImageFolderDataset(root, image_size=16, train=False)
    assert len(ds) == 7
    images, labels = [], []
    for x, y in DataLoader(ds, batch_size=3, shuffle=True, num_workers=0):
        images += list(x)
        labels += y.tolist()
    assert len(images) == 7  # broken files are replaced, the epoch keeps its length
    shown = [good_image_of(x, colours) for x in images]
    assert None not in shown
    assert [label for _, label in shown] == labels  # the substitute brings its own label
    assert set(ds.skipped) == bad
    report = ds.report()
    assert "2 skipped" in report and all(p in report for p in bad)
    # The substitute is the next readable file, the same every time.
    corrupt_index = [p for p, _ in ds.samples].index(str(root / "a" / "1_corrupt.png"))
    assert good_image_of(ds[corrupt_index][0], colours)[0] == ds.samples[corrupt_index + 1][0]


def test_train_mode_survives_broken_files_too(broken_folder):
    root, colours, bad = broken_folder
    ds = ImageFolderDataset(root, image_size=16, train=True, seed=1)
    batches = list(DataLoader(ds, batch_size=7, num_workers=0))
    assert batches[0][0].shape == (7, 3, 16, 16)
    assert set(ds.skipped) == bad


@pytest.mark.parametrize("num_threads", [1, 3])
def test_verify_prunes_broken_files(broken_folder, num_threads):
    root, colours, bad = broken_folder
    ds = ImageFolderDataset(root, image_size=16, train=False)
    report = ds.verify(num_threads=num_threads)
    assert len(ds) == 5 and set(ds.skipped) == bad
    assert "5 images" in report and "2 skipped" in report
    assert sorted(p for p, _ in ds.samples) == sorted(colours)
    shown = sorted(good_image_of(x, colours) for x, _ in ds)
    assert shown == sorted((p, lab) for p, (_, lab) in colours.items())  # each good image once


def test_all_broken_is_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.png").write_bytes(b"nope")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(RuntimeError, match="could be read"):
        ds[0]
    with pytest.raises(ValueError, match="no readable images"):
        ImageFolderDataset(tmp_path, image_size=8).verify()


# --------------------------------------------------------------------------------------------------
# MNIST


@pytest.fixture(scope="module")
def mnist():
    return MNISTDataset(split="train"), MNISTDataset(split="heldout")


def test_mnist_sizes_and_disjoint_stratified_splits(mnist):
    train, held = mnist
    assert (len(train), len(held)) == (4500, 500)
    assert len(train) + len(held) == 5000
    assert set(train.indices.tolist()).isdisjoint(held.indices.tolist())
    assert sorted(train.indices.tolist() + held.indices.tolist()) == list(range(5000))
    assert train.labels.bincount().tolist() == [450] * 10
    assert held.labels.bincount().tolist() == [50] * 10
    assert train.classes == [str(d) for d in range(10)] and train.num_classes == 10
    assert np.array_equal(MNISTDataset(split="heldout").indices, held.indices)  # fixed split


def test_mnist_items_look_like_digits(mnist):
    train, held = mnist
    x, y = train[123]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y <= 9
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    images, labels = held.as_tensors()
    assert images.shape == (500, 3, 32, 32) and labels.min() == 0 and labels.max() == 9
    assert images.min() >= -1 and images.max() <= 1
    background = (images < -0.95).float().mean()
    foreground = (images > 0.5).float().mean()
    assert background > 0.6, background  # white digits on a black field
    assert 0.05 < foreground < 0.35, foreground
    # The frame is (almost always) empty and the middle is where the strokes are.
    assert images[..., :2, :].mean() < -0.99 and images[..., :, -2:].mean() < -0.99
    assert images[..., 12:20, 12:20].mean() > -0.5


def test_mnist_native_size_is_the_raw_data():
    raw, raw_labels = load_mnist_5k()
    ds = MNISTDataset(image_size=28, split="heldout")
    i = 17
    x, y = ds[i]
    row = ds.indices[i]
    assert y == raw_labels[row]
    expected = torch.from_numpy(raw[row].astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(x[0], expected)
    assert MNISTDataset(image_size=16, split="heldout")[0][0].shape == (3, 16, 16)


def test_mnist_errors():
    with pytest.raises(ValueError, match="split"):
        MNISTDataset(split="test")
    with pytest.raises(ValueError, match="image_size"):
        MNISTDataset(image_size=0)


def test_build_dataset(class_folder):
    assert isinstance(build_dataset("mnist", image_size=32, split="heldout"), MNISTDataset)
    assert len(build_dataset("MNIST", image_size=8, split="heldout")) == 500
    ds = build_dataset(class_folder, image_size=16, split="train")
    assert isinstance(ds, ImageFolderDataset) and ds.train and ds.num_classes == 3
    ds = build_dataset(str(class_folder), image_size=16, split="heldout", unconditional=True)
    assert not ds.train and ds.num_classes == 0
    with pytest.raises(ValueError, match="name_or_path"):
        build_dataset("imagenet-but-not-here", image_size=16)
    with pytest.raises(ValueError, match="split"):
        build_dataset("mnist", image_size=16, split="val")
