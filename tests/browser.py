"""A real headless Chromium (Debian's ``chromium``) driven by Playwright, with the network cut off.

``offline_browser()`` yields an :class:`OfflineBrowser`: every request that is not ``file:`` or ``data:`` (or
one of the ``allow``-ed URL prefixes, for a local server under test) is aborted and recorded in ``blocked``.
Screenshots go to :func:`artifacts_dir`. Playwright never downloads a browser here: it drives the system one,
and a missing binary fails the test (CI installs it) rather than skipping it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("GEOAGENT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
LOCAL_SCHEMES = ("file:", "data:")
VIEWPORT = {"width": 1100, "height": 750}
REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 10.0
POLL_S = 0.05


def artifacts_dir() -> Path:
    """Where test runs leave files for people to look at: $GEOAGENT_ARTIFACTS, else ``artifacts/`` at the repo root."""
    folder = Path(os.environ.get("GEOAGENT_ARTIFACTS") or REPO_ROOT / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class OfflineBrowser:
    """A browser context with the network cut off; ``blocked`` lists each URL it refused."""

    context: Any  # playwright.sync_api.BrowserContext
    allow: tuple[str, ...] = ()
    blocked: list[str] = field(default_factory=list)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(LOCAL_SCHEMES) or url.startswith(self.allow):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("internetdisconnected")

    def new_page(self) -> Any:
        """A page whose console errors and uncaught exceptions are collected in ``page.geoagent_errors``."""
        page = self.context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
        page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
        page.geoagent_errors = errors
        return page


def wait_until(page: Any, expression: str, timeout_s: float = WAIT_S) -> Any:
    """Poll a JavaScript expression until it is truthy; its value. (``page.wait_for_function`` evaluates its
    predicate with eval in the page, which a page's Content-Security-Policy may forbid, as GeoAgent's maps do.)"""
    deadline = time.monotonic() + timeout_s
    while not (value := page.evaluate(expression)):
        assert time.monotonic() < deadline, f"not true within {timeout_s} s: {expression}"
        time.sleep(POLL_S)
    return value


def wait_for(page: Any, condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll a condition on this side (e.g. on the requests the route handler logged, which Playwright delivers as
    events while the page is being talked to) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout_s} s: {what}"
        page.evaluate("0")  # a round trip: Playwright dispatches the events that arrived meanwhile
        time.sleep(POLL_S)


@contextmanager
def offline_browser(allow: tuple[str, ...] = ()) -> Iterator[OfflineBrowser]:
    """Chromium with a fresh profile and no network but ``file:``, ``data:`` and the ``allow``-ed URL prefixes."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="geoagent-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            service_workers="block",
        )  # fmt: skip
        browser = OfflineBrowser(context, allow)
        context.route("**/*", browser._route)
        try:
            yield browser
        finally:
            context.close()
