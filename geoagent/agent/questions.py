"""One photo's VLM questions: a question that fails is recorded and the agent goes on without its answer.

A refused image or a model that will not follow the schema costs one answer, not the photo, and never the
batch. Failures that doom every later question too (credentials refused, no such model) still propagate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable
from typing import TypeVar

from geoagent.errors import AnswerError, BackendError, PhotoError, UnreachableError
from geoagent.types import FailedQuestion
from geoagent.vlm import CallStats

T = TypeVar("T")


class QuestionLog:
    """Asks through :meth:`ask`; keeps what failed and counts what was answered (cache hits included)."""

    def __init__(self) -> None:
        self.failed: list[FailedQuestion] = []
        self.answered = 0
        #: What the photo's questions cost, by task; the stages add their answers', failed questions add theirs.
        self.spent: defaultdict[str, CallStats] = defaultdict(CallStats)
        #: The first failure that was the server's, not the model's; an unreachable server's wins over a request
        #: that failed in flight (the server died under it), so a photo lost to a dead server is not blamed.
        self._backend_error: BackendError | None = None

    async def ask(self, question: Awaitable[T], task: str, detail: str) -> T | None:
        """The question's answer, or None when it failed after its retries (recorded)."""
        try:
            result = await question
        except (BackendError, AnswerError) as exc:
            if exc.stops_run:
                raise
            self.failed.append(FailedQuestion(task=task, detail=detail, error=str(exc)))
            if exc.stats is not None:
                self.spent[task].add(exc.stats)
            if isinstance(exc, BackendError) and not isinstance(self._backend_error, UnreachableError):
                self._backend_error = exc if isinstance(exc, UnreachableError) else self._backend_error or exc
            return None
        self.answered += 1
        return result

    def nothing_answered(self, photo: str) -> PhotoError | None:
        """The photo's error when not one question was answered because the backend could not answer.

        A model that answered every question, but never in the schema, leaves the retrieval ranking as the
        answer (each question listed as failed): a rerun would not do better. A server that could not answer
        fails the photo, so a rerun once it is back completes it.
        """
        if self.answered or self._backend_error is None:
            return None
        return PhotoError(
            f"{photo}: none of its {len(self.failed)} VLM questions could be answered: {self._backend_error}",
            cause=self._backend_error,
        )
