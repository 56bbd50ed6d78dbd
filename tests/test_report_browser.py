"""The report in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by selenium. Every image decodes, no request leaves the page, and a screenshot is saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _find(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def chromium_driver(tmp_path: Path, width: int = 1280, height: int = 1600):
    """A selenium Chrome driver on the system's Chromium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser = _find("chromium", "chromium-browser", "google-chrome")
    driver = _find("chromedriver", "chromium-driver")
    if browser is None or driver is None:
        pytest.skip(
            "no headless browser: the test needs Chromium and its driver (Debian: apt-get install chromium "
            f"chromium-driver); found browser={browser}, driver={driver}"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")  # fresh profile every time
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the DevTools network events
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_report_in_headless_chromium(report_run, tmp_path):
    import json

    out, info = report_run
    browser = chromium_driver(tmp_path)
    try:
        url = (out / "report.html").resolve().as_uri()
        browser.get(url)
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        state = browser.execute_script("""
            const imgs = Array.from(document.images);
            return {n: imgs.length,
                    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
                    sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
                    resources: performance.getEntriesByType('resource').map(e => e.name),
                    title: document.title};""")
        shot = tmp_path / "report.png"
        browser.set_window_size(1280, max(1600, min(browser.execute_script("return document.body.scrollHeight"), 8000)))
        assert browser.save_screenshot(str(shot))
        requests = []
        for entry in browser.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                params = message["params"]
                requests.append((params.get("documentURL"), params["request"]["url"]))
    finally:
        browser.quit()
    assert state["n"] > 100 and state["broken"] == []
    assert state["sections"][:3] == ["setting", "metrics", "curves"] and "gallery" in state["sections"]
    assert info["name"] in state["title"]
    assert state["resources"] == []  # nothing fetched: every image is a data URI
    # the report's document loads only itself and its data: images; the browser's own chrome://
    # pages (the start tab) are not the report's, but nothing at all goes to the network
    page = [u for doc, u in requests if doc == url]
    assert url in page
    leaving = [u for u in page if not (u.startswith("data:") or u == url)]
    assert leaving == [], leaving
    network = [u for _, u in requests if u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")]
    assert network == [], network
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("PML_PLUGINS_SCREENSHOT_DIR")  # CI keeps the screenshot as an artifact
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
