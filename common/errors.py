"""Errors that both parties raise, each carrying the gRPC status it maps to at the edge.

Every message names the problem and, where there is one, the fix.
"""

from __future__ import annotations

from enum import Enum


class Status(Enum):
    """The subset of gRPC status codes Gimme uses (names match grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class GimmeError(Exception):
    """Base class: a user-facing error with a status."""

    status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(GimmeError):
    """Malformed or hostile input (uploads, files, listings)."""

    status = Status.INVALID_ARGUMENT


class NotFound(GimmeError):
    status = Status.NOT_FOUND


class WrongState(GimmeError):
    """The request is valid but not now (e.g. deliver before paying)."""

    status = Status.FAILED_PRECONDITION


class Exhausted(GimmeError):
    """A budget, balance or capacity limit is reached."""

    status = Status.RESOURCE_EXHAUSTED


class Refused(GimmeError):
    """A trust check failed: bad signature, weak parameters, tampered delivery."""

    status = Status.PERMISSION_DENIED


class Unavailable(GimmeError):
    """The service is starting or stopping."""

    status = Status.UNAVAILABLE


class Unsupported(BadInput):
    """A model uses something the HE engine cannot evaluate."""


class WorkerFailed(GimmeError):
    """A sandboxed worker process crashed, ran out of memory or time."""

    status = Status.INTERNAL


class Stalled(GimmeError):
    """A peer stopped sending mid-stream; the stream was ended to free its slot."""

    status = Status.DEADLINE_EXCEEDED


def shown(text: str, limit: int = 32) -> str:
    """A client-supplied string as it may appear in a message or log line: quoted, and cut
    to `limit` characters (status details and logs must stay small whatever a peer sends)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
