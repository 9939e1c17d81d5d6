"""Errors a user can act on. Each carries a one-line message; the CLI prints it and picks the exit code."""

from __future__ import annotations


class GeoAgentError(Exception):
    """Base class: a failure with a message fit to show a user as-is."""

    exit_code = 1
    #: True when the failure belongs to one item (a photo) and a batch should go on past it.
    per_item = False


class ConfigError(GeoAgentError):
    """The configuration (file, environment or flags) is invalid."""

    exit_code = 2


class InputError(GeoAgentError):
    """A user-supplied file (photo, CSV, index) cannot be used."""

    per_item = True


class BackendError(GeoAgentError):
    """A VLM backend failed in a way retrying will not fix (missing model, bad key, unreachable server)."""


class AnswerError(GeoAgentError):
    """A VLM answer could not be validated against the expected schema, even after a repair re-ask."""

    per_item = True


class WeightsError(GeoAgentError):
    """Model weights are not available locally."""

    exit_code = 2
