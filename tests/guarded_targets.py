"""Jobs for tests of common.guarded (run inside the guarded child process)."""

from __future__ import annotations

import os
import signal
import time

from common.errors import Exhausted
from common.guarded import Json, ProgressFn


def echo(request: Json, report: ProgressFn) -> Json:
    for step in range(3):
        report({"stage": "counting", "done": step + 1, "total": 3})
    return {"echo": request["value"]}


def crash(request: Json, report: ProgressFn) -> Json:
    report({"stage": request["stage"]})
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


def allocate(request: Json, report: ProgressFn) -> Json:
    report({"stage": "allocating"})
    hog = bytearray(request["bytes"])
    return {"size": len(hog)}


def sleep(request: Json, report: ProgressFn) -> Json:
    report({"stage": "sleeping"})
    time.sleep(request["seconds"])
    return {}


def refuse(request: Json, report: ProgressFn) -> Json:
    raise Exhausted("no budget left")


def slow_start(request: Json, report: ProgressFn) -> Json:
    """Sleeps before its first progress report (a slow import), then again."""
    time.sleep(request["before"])
    report({"stage": "working"})
    time.sleep(request["after"])
    return {}
