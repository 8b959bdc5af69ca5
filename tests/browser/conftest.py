"""The headless Chromium page shared by the UI checks (Debian's /usr/bin/chromium)."""

from __future__ import annotations

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page(prefect_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # The UI bundle calls an analytics host: only the server's own address may be reached.
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith(prefect_server.ui_url) else route.abort())
            yield page
        finally:
            browser.close()
