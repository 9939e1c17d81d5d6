"""The real browser the page tests drive: Debian's Chromium through Playwright, offline, in a fresh profile.

Never ``playwright install``: the system's /usr/bin/chromium is the browser. Missing, it is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
LOCAL_HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


def artifacts_dir() -> Path:
    """Where test runs leave screenshots: $GEOAGENT_ARTIFACTS, else artifacts/ in the repository (git-ignored)."""
    folder = Path(os.environ.get("GEOAGENT_ARTIFACTS") or REPO / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Offline:
    """Every request that tried to leave 127.0.0.1, aborted: (resource type, URL)."""

    blocked: list[tuple[str, str]] = field(default_factory=list)

    def route(self, route: Any) -> None:
        request = route.request
        if urlsplit(request.url).hostname == LOCAL_HOST:
            route.continue_()
        else:
            self.blocked.append((request.resource_type, request.url))
            route.abort()


@contextmanager
def chromium_page(user_data_dir: Path) -> Iterator[tuple[Any, Offline]]:
    """A page in headless Chromium with a fresh profile, every non-local request aborted and recorded."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (the browser tests need a real browser)")
    from playwright.sync_api import sync_playwright

    offline = Offline()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        try:
            context.route("**/*", offline.route)
            page = context.pages[0] if context.pages else context.new_page()
            yield page, offline
        finally:
            context.close()
