"""How a source fails: worth retrying (`SourceUnavailable`) or not (`SourceRefused`).

A module of its own so that the storage SCP, which `base.Source` names as a type, can
raise them without importing `base`.
"""

from __future__ import annotations


class SourceError(Exception):
    """A source could not deliver; the message names the source and says why."""


class SourceUnavailable(SourceError):
    """Down, overloaded or slow (refused connection, timeout, 5xx): worth retrying."""


class SourceRefused(SourceError):
    """The source answered, and the answer will not change (401/403/404, bad data)."""


def http_error(status: int, what: str, said: str = "") -> SourceError:
    """The error for an HTTP status: 5xx, 408 and 429 may pass, the rest will not.
    `said` is the source's own explanation, when it gave one."""
    message = f"{what} answered HTTP {status}" + (f": {said}" if said else "")
    if status >= 500 or status in (408, 429):
        return SourceUnavailable(message)
    return SourceRefused(message)
