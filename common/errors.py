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
