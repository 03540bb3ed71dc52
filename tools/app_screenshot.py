"""A screenshot of the web demo's Compare tab over two real releases, for the README.

    python -m tools.app_screenshot runs/demo/flowar-release runs/demo-var/var-release --label 7 \
        --out docs/images/app-compare-demo.png

Starts ``python -m flowar.app`` on a free port of 127.0.0.1, opens the page in headless Chromium (Debian's
``chromium`` and ``chromium-driver``), compares the two releases from one seed and class, and saves the page.
The browser tests (tests/test_app_browser.py) take the screenshots of every tab on tiny random releases.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from .bench_app import start_app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--label", default="7", help="the class to compare, as the page lists it (id first)")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    server, url = start_app([args.model_a, args.model_b])
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 300, poll_frequency=0.2)
        wait.until(lambda d: d.find_elements("id", "gen-go"))  # the first tab; the others render when opened

        def click_tab(d):
            tab = next(b for b in d.find_elements("css selector", "button[role=tab]") if b.text.strip() == "Compare")
            tab.click()
            return tab.get_attribute("aria-selected") == "true"

        wait.until(click_tab)

        def pick(elem_id, wanted):
            def click_option(d):
                d.find_element("css selector", f"#{elem_id} input").click()
                options = [li for li in d.find_elements("css selector", "[role=option]") if wanted(li.text.replace("✓", "").strip())]
                if options:
                    options[0].click()
                return bool(options)
            wait.until(click_option)

        pick("compare-b", lambda text: text == Path(args.model_b).name)
        pick("compare-class", lambda text: text == args.label or text.startswith(f"{args.label}:"))
        for selector, value in (("#compare-count input[type=number]", args.count), ("#compare-seed input", args.seed)):
            field = driver.find_element("css selector", selector)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value), Keys.TAB)
        driver.find_element("id", "compare-go").click()
        wait.until(lambda d: d.find_element("id", "compare-status").text.count("ms/image") == 2)
        time.sleep(1)
        driver.save_screenshot(args.out)
        print(driver.find_element("id", "compare-status").text)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
