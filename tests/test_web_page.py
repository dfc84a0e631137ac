"""The web page at ``/`` in headless Chromium: upload a photo, see top-5 bars and the overlay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carclf.data.manifest import read_manifest

from .conftest import SERVE_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason="chromium is not installed (apt-get install chromium; .ci/run installs it)",
    ),
]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_page_shows_top5_bars_and_gradcam_overlay(
    served_app: str, toy_manifest: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    photo = read_manifest(toy_manifest).split("test")[0][0]
    screenshot = tmp_path / "web_page.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(served_app + "/")
            page.fill("#key", SERVE_KEY)
            page.set_input_files("#file", photo)
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            assert page.locator("#error").inner_text() == ""
            card = page.locator("section.model[data-model=body]")
            assert card.locator(".bar").count() == 5
            widths = card.locator(".fill").evaluate_all("els => els.map(e => e.style.width)")
            assert all(w.endswith("%") for w in widths)
            overlay = card.locator("img.overlay")
            assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"web page screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0
