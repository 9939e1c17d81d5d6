"""The terminal's status line: what a command waits for while models load, shown only where someone watches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.text import Text


class StatusLine:
    """What the command waits for (``geoagent.loading``: "loading CLIP ViT-B-32"), as one transient spinner line on
    ``console`` (stderr), installed only when that is a terminal. While a progress bar is up, the bar's label says it
    instead (rich draws one live display at a time); a bar attached without a task just hides the line."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._lock = threading.RLock()
        self._doing: list[str] = []
        self._spinner: Any = None
        self._bar: tuple[Any, Any, str] | None = None  # (Progress, task or None, the task's own label)

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        with self._lock:
            self._doing.append(what)
            self._show()
        try:
            yield
        finally:
            with self._lock:
                self._doing.remove(what)
                self._show()

    def _show(self) -> None:
        text = "; ".join(self._doing) + "…" if self._doing else ""
        if self._bar is not None:
            bar, task, label = self._bar
            if task is not None:
                bar.update(task, description=f"{label} ({text})" if text else label)
        elif text and self._spinner is None:
            self._spinner = self._console.status(Text(text), spinner="dots")
            self._spinner.start()
        elif text:
            self._spinner.update(Text(text))
        if self._spinner is not None and (not text or self._bar is not None):
            self._spinner.stop()
            self._spinner = None

    def attach(self, bar: Any, task: Any = None, label: str = "") -> None:
        """A progress bar goes up: the loads show in ``task``'s label (none: not at all) until :meth:`detach`."""
        with self._lock:
            self._bar = (bar, task, label)
            self._show()

    def detach(self) -> None:
        with self._lock:
            self._bar = None
            self._show()
