"""The web demo in a real browser: ``python -m flowar.app`` serves two tiny releases made here on 127.0.0.1,
and headless Chromium (Debian's ``chromium`` through its ``chromium-driver``) works the page as a user does.

These tests need the ``[app]`` and ``[test]`` extras and the two Debian packages; where one is missing they
fail with what to install (``.ci/run`` installs all of them), they never pass without a browser.
Set FLOWAR_APP_SCREENSHOTS to a folder to keep the screenshots of each tab (docs/images holds them).
"""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_flowar_pipeline, tiny_var_pipeline
from PIL import Image

from flowar.outputs import image_grid, read_png_settings
from flowar.registry import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ("apt-get install chromium chromium-driver (Debian's browser and its WebDriver), then "
           "pip install -e '.[app,test]' (Gradio and Selenium)")
WAIT = 120  # seconds for a page, a request or the server; a loaded CI machine is slow, a hang is not


def requirement(what: str):
    pytest.fail(f"the web demo's browser tests need {what}: {INSTALL}", pytrace=False)


@pytest.fixture(scope="module")
def webdriver():
    try:
        import gradio  # noqa: F401  (the server needs it)
        from selenium import webdriver
    except ImportError as err:
        requirement(f"the [app] and [test] extras ({err})")
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            requirement(f"the program {program}")
    return webdriver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(webdriver, tmp_path_factory):
    """(url, release folders by name): the demo's own command on a free port, one thread per process."""
    root = tmp_path_factory.mktemp("app")
    flowar = tiny_flowar_pipeline()
    flowar.class_names = [f"digit {i}" for i in range(flowar.model.config.num_classes)]
    flowar.save_pretrained(root / "flowar")
    tiny_var_pipeline().save_pretrained(root / "var")
    port = free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "flowar.app", str(root / "flowar"), str(root / "var"),
                                "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the demo server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, {"flowar": root / "flowar", "var": root / "var"}
    process.terminate()
    process.wait(timeout=30)
    log.close()


def open_browser(webdriver, url):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements("id", "gen-go"), "the page to load")
    return driver


@pytest.fixture
def page(webdriver, server):
    driver = open_browser(webdriver, server[0])
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = os.environ.get("FLOWAR_APP_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


# ---------------------------------------------------------------------------------------------- page helpers
def wait_for(driver, condition, what: str, timeout: float = WAIT):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # Gradio re-renders its lists: an element found a moment ago may be gone, so look again
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except Exception:
        raise AssertionError(f"timed out waiting for {what}; the page says:\n{driver.find_element('tag name', 'body').text[:2000]}") from None


def css(driver, selector):
    """The element ``selector`` finds, once it is there (Gradio renders tabs and accordions as they open)."""
    return wait_for(driver, lambda d: d.find_elements("css selector", selector), selector)[0]


def open_tab(driver, name: str):
    tab = next(b for b in driver.find_elements("css selector", "button[role=tab]") if b.text.strip() == name)
    tab.click()
    wait_for(driver, lambda d: tab.get_attribute("aria-selected") == "true", f"the {name} tab")


def type_into(driver, selector: str, value):
    from selenium.webdriver.common.keys import Keys

    field = css(driver, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def choose(driver, elem_id: str, option: str):
    """Pick ``option`` (its shown text) in the Gradio dropdown ``elem_id``."""
    css(driver, f"#{elem_id} input").click()

    def click_option(d):
        item = next((li for li in d.find_elements("css selector", "[role=option]")
                     if li.text.replace("✓", "").strip() == option), None)  # ✓ marks the chosen one
        if item is not None:
            item.click()
        return item is not None

    wait_for(driver, click_option, f"option {option!r} of {elem_id}")
    wait_for(driver, lambda d: css(d, f"#{elem_id} input").get_attribute("value") == option, f"{elem_id} = {option}")


def status(driver, elem_id: str, pattern: str) -> str:
    """Wait until the status line ``elem_id`` matches ``pattern``; its text."""
    return wait_for(driver, lambda d: (m := re.search(pattern, css(d, f"#{elem_id}").text)) and m.string,
                    f"{elem_id} to say {pattern!r}")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def shown_image(driver, elem_id: str) -> Image.Image:
    """The picture the output ``elem_id`` shows, as the browser loaded it."""
    img = wait_for(driver, lambda d: d.find_elements("css selector", f"#{elem_id} img"), f"an image in {elem_id}")[0]
    wait_for(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img),
             f"{elem_id}'s image to load")
    return Image.open(io.BytesIO(fetch(img.get_attribute("src")))).convert("RGB")


def downloaded_pngs(driver, elem_id: str) -> list[tuple[np.ndarray, dict]]:
    """(pixels, settings) of each PNG in the zip the file output ``elem_id`` offers."""
    link = wait_for(driver, lambda d: d.find_elements("css selector", f"#{elem_id} a[href]"), f"a download in {elem_id}")[0]
    archive = zipfile.ZipFile(io.BytesIO(fetch(link.get_attribute("href"))))
    out = []
    for name in sorted(archive.namelist()):
        data = archive.read(name)
        out.append((np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), read_png_settings(data)))
    return out


def assert_grid_of(shown: Image.Image, images: list[np.ndarray], nrow: int):
    """The shown grid is the images' grid enlarged by a whole factor, and not blank."""
    grid = image_grid(np.stack(images), nrow)
    factor = shown.width // grid.width
    assert factor >= 1 and shown.size == (grid.width * factor, grid.height * factor), (shown.size, grid.size)
    assert np.array_equal(np.asarray(shown.resize(grid.size, Image.Resampling.NEAREST)), np.asarray(grid))
    pixels = np.stack(images).astype(float)
    assert pixels.std() > 5 and len({p.tobytes() for p in images}) == len(images), "blank or repeated images"


def library_images(folder, label: int, count: int, seed: int, **options) -> np.ndarray:
    torch.set_num_threads(1)
    pipe = load_pipeline(folder)
    return pipe([label] * count, generator=torch.Generator().manual_seed(seed), output_type="np", **options)


def generate_in(driver, *, klass: str, seed: int, count: int, steps: str | None = None, click: bool = True):
    open_tab(driver, "Generate")
    choose(driver, "gen-class", klass)
    type_into(driver, "#gen-seed input", seed)
    type_into(driver, "#gen-count input[type=number]", count)
    if steps is not None:
        type_into(driver, "#gen-steps textarea", steps)
    if click:
        css(driver, "#gen-go").click()


# ---------------------------------------------------------------------------------------------- tests
def test_generate_shows_the_library_s_images_as_a_grid_and_pngs(page, server, screenshots):
    generate_in(page, klass="3: digit 3", seed=5, count=4, steps="3")
    status(page, "gen-status", r"4 images of class 3, seed 5, from flowar in .* ms/image")
    pngs = downloaded_pngs(page, "gen-files")
    images = [p for p, _ in pngs]
    assert_grid_of(shown_image(page, "gen-grid"), images, 4)
    assert [s["index"] for _, s in pngs] == [0, 1, 2, 3]
    assert all(s["seed"] == 5 and s["class_name"] == "digit 3" and s["sampling"]["steps"] == 3 for _, s in pngs)
    own = library_images(server[1]["flowar"], 3, 4, 5, steps=3)
    assert np.abs(np.stack(images).astype(float) - own).mean() < 1.0
    page.save_screenshot(str(screenshots / "app-generate.png"))


def test_edit_regenerates_the_painted_region(page, tmp_path, screenshots):
    from selenium.webdriver.common.action_chains import ActionChains

    open_tab(page, "Edit")
    source = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "photo.png")
    css(page, "#edit-upload input[type=file]").send_keys(str(tmp_path / "photo.png"))
    status(page, "edit-status", "16x16 image ready")
    brush = wait_for(page, lambda d: d.find_elements("css selector", "#edit-canvas button[aria-label=Brush]"),
                     "the brush")[0]
    brush.click()
    canvas = css(page, "#edit-canvas canvas")
    stroke = ActionChains(page).move_to_element(canvas).click_and_hold()
    for _ in range(6):
        stroke.move_by_offset(8, 0)
    stroke.release().perform()
    type_into(page, "#edit-seed input", 4)
    css(page, "#edit-go").click()
    status(page, "edit-status", r"4 images of class 0, seed 4, from flowar in .* ms/image")
    pngs = downloaded_pngs(page, "edit-files")
    assert_grid_of(shown_image(page, "edit-grid"), [p for p, _ in pngs], 4)
    assert all(s["task"] == "inpaint" and s["seed"] == 4 for _, s in pngs)
    page.save_screenshot(str(screenshots / "app-edit.png"))


def test_bad_inputs_show_a_message_in_the_page_and_the_server_keeps_serving(page, tmp_path, screenshots):
    open_tab(page, "Edit")
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "big.png")
    css(page, "#edit-upload input[type=file]").send_keys(str(tmp_path / "big.png"))
    status(page, "edit-status", r"Error: the image is 20x20 pixels; flowar edits 16x16 images")
    page.save_screenshot(str(screenshots / "app-bad-input.png"))

    generate_in(page, klass="1: digit 1", seed=0, count=2, steps="0")
    status(page, "gen-status", r"Error: steps must be a whole number from 1 to 1000, got '0'")

    css(page, "#loader").click()
    type_into(page, "#load-path textarea", str(tmp_path))
    css(page, "#load-go").click()
    status(page, "load-status",
           rf"Error: {re.escape(str(tmp_path))} is not a FlowAR, VAR, FlexVAR or xAR release folder")

    type_into(page, "#gen-steps textarea", "2")
    css(page, "#gen-go").click()
    status(page, "gen-status", r"2 images of class 1, seed 0, from flowar in")


def test_compare_shows_both_models_with_their_times(page, screenshots):
    open_tab(page, "Compare")
    choose(page, "compare-a", "flowar")
    choose(page, "compare-b", "var")
    choose(page, "compare-class", "2: digit 2")
    type_into(page, "#compare-count input[type=number]", 4)
    css(page, "#compare-go").click()
    text = status(page, "compare-status", r"from var in .* ms/image")
    assert re.search(r"4 images of class 2, seed 0, from flowar in .* ms/image", text)
    a, b = shown_image(page, "compare-grid-a"), shown_image(page, "compare-grid-b")
    for shown in (a, b):
        assert np.asarray(shown).std() > 5
    page.save_screenshot(str(screenshots / "app-compare.png"))


def test_two_pages_at_once_both_get_their_own_images(webdriver, server):
    pages = [open_browser(webdriver, server[0]) for _ in range(2)]
    try:
        requests = [("2: digit 2", 2, 11), ("7: digit 7", 7, 12)]
        for driver, (klass, _, seed) in zip(pages, requests):
            generate_in(driver, klass=klass, seed=seed, count=16, steps="20", click=False)
        for driver in pages:  # back to back: the second request arrives while the first samples
            css(driver, "#gen-go").click()
        for driver, (_, label, seed) in zip(pages, requests):
            status(driver, "gen-status", rf"16 images of class {label}, seed {seed}, from flowar")
            images = np.stack([p for p, _ in downloaded_pngs(driver, "gen-files")]).astype(float)
            own = library_images(server[1]["flowar"], label, 16, seed, steps=20)
            assert np.abs(images - own).mean() < 1.0
    finally:
        for driver in pages:
            driver.quit()
