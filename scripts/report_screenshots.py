"""Screenshots of a report.html for the docs, taken with headless Chromium through selenium.

Usage: python scripts/report_screenshots.py REPORT.html OUT.png FIRST_SECTION [LAST_SECTION]

Crops the page from section FIRST_SECTION to the end of LAST_SECTION (default: the same), for
example ``gallery`` or ``embedding-map per-class`` (the section ids are in
``pml_plugins.report.run_report.RUN_SECTIONS``), and saves a 128-colour PNG. The browser runs
with the same flags as tests/test_report_browser.py.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def screenshot(report: Path, out: Path, first: str, last: str, width: int = 1100, max_height: int = 1000) -> None:
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},1200")
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            driver.get(report.resolve().as_uri())
            driver.set_window_size(width, driver.execute_script("return document.body.scrollHeight") + 150)
            top = driver.execute_script(f"return document.getElementById('{first}').getBoundingClientRect().top")
            bottom = driver.execute_script(f"return document.getElementById('{last}').getBoundingClientRect().bottom")
            image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        finally:
            driver.quit()
    bottom = min(bottom + 8, top - 8 + max_height) if first == last else bottom + 8
    crop = image.crop((0, int(top - 8), width, int(bottom)))
    crop.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {crop.size[0]}x{crop.size[1]}, {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[-1])
