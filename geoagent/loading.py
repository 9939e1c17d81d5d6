"""What a slow load is waiting for ("loading CLIP ViT-B-32"), told to whoever shows it.

The parts that load models (retrieval, the ranker) wrap the wait in :func:`loading`; the CLI installs an announcer
that shows a status line on a terminal, and nothing is shown anywhere else. Announcements may come from worker
threads, several at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

Announcer = Callable[[str], AbstractContextManager[object]]
_announcer: Announcer | None = None


def set_announcer(announcer: Announcer | None) -> None:
    """Show every :func:`loading` wait through ``announcer(text)`` (a context manager); None: show nothing."""
    global _announcer
    _announcer = announcer


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Announce ``what`` is being waited for (``"loading CLIP ViT-B-32"``) for as long as the block runs."""
    with (_announcer or (lambda _text: nullcontext()))(what):
        yield
