"""Errors a user can act on. Each carries a one-line message; the CLI prints it and picks the exit code.

Three scopes matter to a batch: a failure of one *question* (the agent records it and goes on without that
answer), of one *photo* (named, the batch goes on) and of the whole *run* (every photo would fail the same
way: say so once and stop).
"""

from __future__ import annotations

from typing import Any


class GeoAgentError(Exception):
    """Base class: a failure with a message fit to show a user as-is."""

    exit_code = 1
    #: True when the failure belongs to one item (a photo) and a batch should go on past it.
    per_item = False
    #: True when no later question to the same backend can succeed either (credentials refused, no such model).
    stops_run = False
    #: What a failed VLM question cost (a ``CallStats``), set by the client that gave up on it.
    stats: Any = None


class ConfigError(GeoAgentError):
    """The configuration (file, environment or flags) is invalid."""

    exit_code = 2
    stops_run = True


class CacheError(ConfigError):
    """The response cache cannot be used as configured (a corrupt file, a folder that is a file, Redis down)."""


class InputError(GeoAgentError):
    """A user-supplied file (photo, CSV, index) cannot be used."""

    per_item = True


class BackendError(GeoAgentError):
    """A VLM question failed in a way retrying will not fix (refused request, retries exhausted)."""


class UnreachableError(BackendError):
    """The server cannot be reached at all: answers already cached still can be used."""

    exit_code = 2


class AuthError(BackendError):
    """The server refused the credentials: every request will be refused."""

    exit_code = 2
    stops_run = True


class ModelMissingError(BackendError):
    """The server does not have the model: every request will fail."""

    exit_code = 2
    stops_run = True


class WrongServerError(BackendError):
    """Something other than the expected API answers at the URL (a proxy page, a web app): every request will fail."""

    exit_code = 2
    stops_run = True


class AnswerError(GeoAgentError):
    """A VLM answer could not be validated against the expected schema, even after a repair re-ask."""

    per_item = True


class PhotoError(GeoAgentError):
    """Nothing usable remained for one photo: every VLM question about it failed.

    ``cause`` is the first server failure among its questions (an unreachable server before anything else), so a
    batch can tell a dead server from a picky model.
    """

    per_item = True

    def __init__(self, message: str, cause: GeoAgentError) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable (a Ray worker sends it back to the driver): rebuilt with its cause."""
        return type(self), (self.args[0], self.cause), self.__dict__


class RunStopped(GeoAgentError):
    """The run stopped early because every remaining photo would fail (the message says why)."""

    exit_code = 2


class WeightsError(GeoAgentError):
    """Model weights are not available locally."""

    exit_code = 2
    stops_run = True
