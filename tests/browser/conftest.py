"""The headless Chromium page shared by the UI checks (Debian's /usr/bin/chromium)."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class BrowserUI:
    """A Chromium page on the test server's UI that remembers what went wrong while loading.

    `open` loads a UI path and waits for what it should show. A page that shows nothing is
    loaded once more (as a user would reload it) with a warning naming what went wrong; a page
    that shows nothing twice fails with the failed requests, console errors and page text.
    """

    def __init__(self, page, ui_url: str):
        self.page = page
        self.ui_url = ui_url
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error"
                and m.location.get("url", "").startswith(ui_url)
                and self.problems.append(f"console: {m.text}"))
        page.on("requestfailed", lambda r: r.url.startswith(ui_url) and self.problems.append(
            f"failed: {r.method} {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"HTTP {r.status}: {r.request.method} {r.url}"))

    def open(self, path: str, shown: Callable[[object], object], timeout_ms: int = 60_000) -> None:
        from playwright.sync_api import expect

        self.page.goto(f"{self.ui_url}{path}")
        try:
            expect(shown(self.page)).to_be_visible(timeout=timeout_ms)
            return
        except AssertionError:
            first = self._report(path)
        self.problems.clear()
        self.page.reload()
        try:
            expect(shown(self.page)).to_be_visible(timeout=timeout_ms)
        except AssertionError:
            raise AssertionError(f"{first}\n\nand after a reload:\n{self._report(path)}") from None
        warnings.warn(f"shown only after a reload: {first}")

    def _report(self, path: str) -> str:
        text = self.page.locator("body").inner_text(timeout=5_000)[:1500]
        problems = "\n".join(self.problems[-30:]) or "(no failed request, no console error)"
        return f"{path} showed nothing expected.\n{problems}\npage text:\n{text}"


@pytest.fixture
def ui(prefect_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # The UI bundle calls an analytics host: only the server's own address may be reached.
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith(prefect_server.ui_url) else route.abort())
            yield BrowserUI(page, prefect_server.ui_url)
        finally:
            browser.close()
