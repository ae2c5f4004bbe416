"""A headless Chromium driven by Playwright (for the MLflow UI test)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    env = os.environ.get("TIMEVLM_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)


def why_no_browser() -> str | None:
    """None when a browser test can run, else the reason it cannot (for pytest.skip)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; .ci/run installs it)"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set TIMEVLM_CHROMIUM; .ci/run installs it)"
    return None


@contextlib.contextmanager
def chromium_page(width: int = 1600, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()
