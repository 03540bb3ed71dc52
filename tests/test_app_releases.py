"""The web demo's model side (``flowar.app.releases``), without a browser: the page's checks and messages, the
images against the library's own, one request at a time per model, cancellation, the PNGs' settings."""

import io
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import tiny_flowar_pipeline, tiny_vae, tiny_var_pipeline
from PIL import Image

from flowar import XAR, XARPipeline, get_xar_preset
from flowar.app.releases import Cancelled, Release, Releases, RequestError, fit_image, outpaint_region
from flowar.outputs import read_png_settings


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    flowar = tiny_flowar_pipeline()
    flowar.class_names = [f"digit {i}" for i in range(flowar.model.config.num_classes)]
    flowar.save_pretrained(root / "flowar")
    tiny_var_pipeline().save_pretrained(root / "var")
    torch.manual_seed(0)
    XARPipeline(XAR(get_xar_preset("xar-tiny")).eval(), tiny_vae(0)).save_pretrained(root / "xar")
    return root


@pytest.fixture(scope="module")
def flowar(folders):
    return Release(folders / "flowar")


@pytest.fixture(scope="module")
def var(folders):
    return Release(folders / "var")


@pytest.fixture(scope="module")
def xar(folders):
    return Release(folders / "xar")


def test_a_folder_that_is_not_a_release_is_refused_by_name(tmp_path):
    with pytest.raises(RequestError, match="does not exist"):
        Release(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(RequestError, match=r"notes is not a FlowAR, VAR, FlexVAR or xAR release folder: .*config.json"):
        Release(tmp_path / "notes")


def test_generate_gives_the_library_s_own_images_and_settings(flowar, folders):
    options = flowar.sampling(steps=3, guidance_scale=2.0)
    result = flowar.generate(2, 3, 7, options)
    own = flowar.pipeline([2, 2, 2], sampling=options, generator=torch.Generator().manual_seed(7), output_type="np")
    assert np.array_equal(result.images, own)
    assert result.sampling_seconds > 0 and result.decoding_seconds > 0
    pngs = zipfile.ZipFile(io.BytesIO(result.zip_bytes("x")))
    names = sorted(pngs.namelist())
    assert names == ["x-000.png", "x-001.png", "x-002.png"]
    for i, name in enumerate(names):
        data = pngs.read(name)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), own[i])
        settings = read_png_settings(data)
        assert settings["class_id"] == 2 and settings["class_name"] == "digit 2" and settings["seed"] == 7
        assert settings["index"] == i and settings["sampling"]["steps"] == 3
        assert settings["sampling"]["guidance_scale"] == 2.0 and settings["release"] == str(folders / "flowar")


def test_var_takes_top_k_and_top_p_and_gives_the_library_s_images(var):
    options = var.sampling(top_k=5, top_p=0.9)
    assert (options.top_k, options.top_p) == (5, 0.9)
    result = var.generate(4, 2, 1, options)
    own = var.pipeline([4, 4], sampling=options, generator=torch.Generator().manual_seed(1), output_type="np")
    assert np.array_equal(result.images, own)


@pytest.mark.parametrize("controls, message", [
    ({"steps": "0"}, "steps must be a whole number from 1 to 1000, got '0'"),
    ({"steps": "2.5"}, "steps must be a whole number"),
    ({"steps": "10,x"}, "got 'x'"),
    ({"steps": "5,5"}, "steps"),  # two counts for a model of four scales
    ({"solver": "leapfrog"}, "solver must be one of"),
    ({"guidance_scale": 0.5}, "guidance scale must be a number from 1.0 to 20.0"),
    ({"solver": "flow-map"}, "flow-map"),  # an ordinary head cannot jump
])
def test_bad_flowar_controls_are_refused_with_the_control_s_name(flowar, controls, message):
    with pytest.raises(RequestError, match=message):
        flowar.sampling(**controls)


def test_bad_var_controls_are_refused_with_the_control_s_name(var):
    with pytest.raises(RequestError, match=r"top-k must be a whole number from 0 to \d+"):
        var.sampling(top_k=-1)
    with pytest.raises(RequestError, match="top-p must be a number from 0.0 to 1.0"):
        var.sampling(top_p=1.5)


def test_per_scale_steps_and_the_adaptive_solver(flowar):
    assert flowar.sampling(steps="4,3,2,2").steps == (4, 3, 2, 2)
    assert flowar.sampling(solver="dopri5", steps="7").steps is None  # adaptive: the solver picks its steps


def test_xar_takes_steps_per_cell_and_its_solvers_and_gives_the_library_s_images(xar):
    assert xar.side == 16 and "4 cells of 4x4 tokens" in xar.describe()
    assert xar.solvers == ("sde", "euler", "midpoint", "rk4", "dopri5")
    options = xar.sampling(steps="3,2,4,2", solver="sde", guidance_scale=2.0, top_k=0, top_p=0.0)
    assert options.steps == (3, 2, 4, 2)
    result = xar.generate(5, 2, 3, options)
    own = xar.pipeline([5, 5], sampling=options, generator=torch.Generator().manual_seed(3), output_type="np")
    assert np.array_equal(result.images, own) and result.settings[0]["sampling"]["steps"] == [3, 2, 4, 2]
    assert xar.sampling(solver="euler", steps="2").steps == 2
    with pytest.raises(RequestError, match="steps must hold one count per cell"):
        xar.sampling(steps="3,3")
    with pytest.raises(RequestError, match="steps must be an integer >= 2 for the sde solver"):
        xar.sampling(steps="3,1,3,3", solver="sde")
    with pytest.raises(RequestError, match="solver must be one of"):
        xar.sampling(solver="flow-map")


def test_an_xar_edit_is_the_library_s_in_painting(xar):
    side = xar.side
    options = xar.sampling(steps="3")
    image = image_of(side, seed=2)
    result = xar.edit(image, left_half(side), 4, 2, 6, options)
    keep = torch.from_numpy(~left_half(side)).float()
    own = xar.pipeline.inpaint(np.repeat(np.asarray(image)[None], 2, axis=0), keep, 4, sampling=options,
                               generator=torch.Generator().manual_seed(6), output_type="np")
    assert np.array_equal(result.images, own)
    speck = np.zeros((side, side), dtype=bool)
    speck[0, 0] = True
    with pytest.raises(RequestError, match="covers no whole latent cell"):
        xar.check_mask(speck)


def test_requests_are_checked_before_sampling(flowar):
    options = flowar.defaults
    with pytest.raises(RequestError, match="number of images must be a whole number from 1 to 64"):
        flowar.generate(1, 0, 0, options)
    with pytest.raises(RequestError, match="class must be a whole number from -1 to 9"):
        flowar.generate(10, 1, 0, options)
    with pytest.raises(RequestError, match="seed"):
        flowar.generate(1, 1, -3, options)
    with pytest.raises(RequestError, match="Generate needs a class"):
        flowar.generate(-1, 1, 0, options)


def test_class_choices_use_the_names_where_the_release_has_them(flowar, var):
    assert flowar.class_choices()[:2] == [("0: digit 0", 0), ("1: digit 1", 1)]
    assert var.class_choices()[:2] == [("0", 0), ("1", 1)]
    assert flowar.class_choices(with_null=True)[0] == ("no class (null)", -1)


# ---------------------------------------------------------------------------------------------- editing
def image_of(side, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(pixels, "RGBA")
    return Image.fromarray(pixels[..., :3]).convert(mode)


def left_half(side):
    region = np.zeros((side, side), dtype=bool)
    region[:, : side // 2] = True
    return region


def test_an_edit_keeps_the_library_s_in_painting(flowar):
    side = flowar.side
    options = flowar.sampling(steps=2)
    image = image_of(side)
    result = flowar.edit(image, left_half(side), -1, 2, 5, options)
    keep = torch.from_numpy(~left_half(side)).float()
    own = flowar.pipeline.inpaint(np.repeat(np.asarray(image)[None], 2, axis=0), keep, None, sampling=options,
                                  generator=torch.Generator().manual_seed(5), output_type="np")
    assert np.array_equal(result.images, own)
    assert result.settings[0]["task"] == "inpaint" and result.settings[0]["class_id"] is None


@pytest.mark.parametrize("image, message", [
    (lambda side: image_of(side + 4), r"the image is (\d+)x\1 pixels; flowar edits (\d+)x\2 images"),
    (lambda side: image_of(side, "RGBA"), "transparent pixels"),
    (lambda side: image_of(side, "CMYK"), "mode is CMYK; the allowed modes are RGB and L"),
    (lambda side: None, "upload an image"),
])
def test_bad_images_are_refused_with_what_is_allowed(flowar, image, message):
    with pytest.raises(RequestError, match=message):
        flowar.edit(image(flowar.side), left_half(flowar.side), 1, 1, 0, flowar.defaults)


def test_grayscale_and_opaque_rgba_images_are_taken(flowar):
    side = flowar.side
    options = flowar.sampling(steps=2)
    opaque = image_of(side, "RGBA")
    opaque.putalpha(255)
    for image in (image_of(side, "L"), opaque):
        assert flowar.edit(image, left_half(side), 1, 1, 0, options).images.shape == (1, side, side, 3)


def test_masks_that_keep_everything_or_nothing_are_refused(flowar):
    side = flowar.side
    with pytest.raises(RequestError, match="keeps the whole image"):
        flowar.check_mask(np.zeros((side, side), dtype=bool))
    with pytest.raises(RequestError, match="keeps nothing"):
        flowar.check_mask(np.ones((side, side), dtype=bool))
    speck = np.zeros((side, side), dtype=bool)
    speck[0, 0] = True  # a quarter of one latent cell: area resizing keeps the cell
    with pytest.raises(RequestError, match="covers no whole latent cell"):
        flowar.check_mask(speck)


def test_outpainting_keeps_a_centred_square():
    region = outpaint_region(16, 0.5)
    assert not region[4:12, 4:12].any() and region.sum() == 16 * 16 - 8 * 8
    with pytest.raises(RequestError, match="kept centre must be a number from 0.1 to 0.95"):
        outpaint_region(16, 1.0)


def test_fit_crops_the_centre_and_resizes():
    wide = Image.new("RGB", (30, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (5, 0, 25, 20))  # the centred 20x20 square is white, the sides black
    fitted = fit_image(wide, 10)
    assert fitted.size == (10, 10) and np.asarray(fitted).min() == 255


# ---------------------------------------------------------------------------------------------- queue
def test_one_request_at_a_time_per_model(folders):
    release = Release(folders / "flowar")
    options = release.sampling(steps=2)
    events, errors = [], []

    def request(name):
        def progress(fraction, text):
            events.append((name, text))
            time.sleep(0.02)  # give the other request every chance to interleave
        try:
            release.generate(1, 2, 0, options, progress=progress)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=request, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    scales = [name for name, text in events if text.startswith(("scale", "decoding"))]
    first = scales[0]
    n = len(release.model.config.scales) + 1
    assert scales == [first] * n + [("b" if first == "a" else "a")] * n, scales


def test_a_cancelled_request_stops_between_scales_and_frees_the_model(folders):
    release = Release(folders / "flowar")
    options = release.sampling(steps=2)
    cancel = threading.Event()
    seen = []

    def progress(fraction, text):
        seen.append(text)
        if text == "scale 2 of 4":
            cancel.set()

    with pytest.raises(Cancelled, match="after scale 2 of 4"):
        release.generate(1, 1, 0, options, cancel=cancel, progress=progress)
    assert "scale 3 of 4" not in seen
    assert not release.lock.locked()
    assert release.generate(1, 1, 0, options).images.shape[0] == 1


def test_a_request_waiting_for_the_model_can_be_cancelled(folders):
    release = Release(folders / "flowar")
    cancel = threading.Event()
    release.lock.acquire()
    try:
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(Cancelled, match="waiting"):
            release.generate(1, 1, 0, release.sampling(steps=2), cancel=cancel)
    finally:
        release.lock.release()


def test_releases_load_each_folder_once_and_name_them_apart(folders, tmp_path):
    releases = Releases()
    a = releases.load(folders / "flowar")
    assert releases.load(folders / "flowar") is a
    tiny_flowar_pipeline(seed=1).save_pretrained(tmp_path / "flowar")
    b = releases.load(tmp_path / "flowar")
    assert releases.names == ["flowar", "flowar (2)"] and releases["flowar (2)"] is b
    with pytest.raises(RequestError, match="choose a model"):
        releases["other"]


def test_a_release_that_samples_any_list_takes_the_page_s_scales(tmp_path, flowar):
    """FlexVAR (and a flexible FlowAR) sample the page's list of sides, larger ones giving larger images; a
    fixed-list release refuses a list, and bad text names the control."""
    from flowar import FlexVAR, FlexVARPipeline, get_flexvar_preset
    from vae.flexvq import FlexVQVAE, get_flexvq_preset

    torch.manual_seed(0)
    FlexVARPipeline(FlexVAR(get_flexvar_preset("flexvar-tiny", depth=2, width=64, num_heads=2)),
                    FlexVQVAE(get_flexvq_preset("mnist"))).save_pretrained(tmp_path / "flexvar")
    release = Release(tmp_path / "flexvar")
    assert release.samples_any_scales and not flowar.samples_any_scales
    options = release.sampling(scales="1, 2, 4, 8, 12", top_k=5)
    assert options.scales == (1, 2, 4, 8, 12)
    result = release.generate(3, 2, 1, options)
    assert result.images.shape == (2, 48, 48, 3)
    own = release.pipeline([3, 3], sampling=options, generator=torch.Generator().manual_seed(1), output_type="np")
    assert np.array_equal(result.images, own)
    assert release.sampling(scales="").scales is None  # empty: the release's own list
    for text, message in (("1,2,x", "comma-separated"), ("2,4,8", "scales"), ("1,2,4,64", "max_side")):
        with pytest.raises(RequestError, match=message):
            release.sampling(scales=text)
    with pytest.raises(RequestError, match="only its own scales"):
        flowar.sampling(scales="1,2,4")
