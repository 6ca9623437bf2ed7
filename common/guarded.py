"""Run one job in a throwaway process with a memory limit and a time limit.

Untrusted OpenFHE bytes are only ever opened inside such a process: if they crash it
(SIGSEGV, SIGABRT, heap corruption) or make it allocate gigabytes, the caller gets a
clear error and keeps running. Each job gets a fresh process, so OpenFHE's
process-global key maps never hold two trials' keys.

Protocol: the parent starts `python -m common.guarded MEMORY_BYTES module:function`,
writes the JSON request on stdin and reads JSON lines from stdout:
{"progress": {...}}, then exactly one {"result": {...}} or {"error": {...}}.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import errors

Json = dict[str, Any]
ProgressFn = Callable[[Json], None]
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_ERROR_TYPES: dict[str, type[errors.GimmeError]] = {
    cls.__name__: cls
    for cls in (errors.BadInput, errors.Unsupported, errors.Refused, errors.WrongState,
                errors.Exhausted, errors.NotFound, errors.Unavailable, errors.WorkerFailed)
}


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 6 << 30
    timeout_s: float = 900.0


# glibc hands blocks of 128 KiB and more back to the kernel when freed; OpenFHE allocates
# every ciphertext tower (N=16384: 128 KiB) afresh, and each fresh page faults (~6 us a
# page on our 2-core VM). Keeping freed memory in the heap took CryptoNets' evaluation
# from 19.5 to 16.5 s (bench/run.py).
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=1073741824:"
                   "glibc.malloc.top_pad=67108864")


def worker_environment() -> dict[str, str]:
    """One OpenMP thread, no spin-waiting: parallelism comes from processes (see DESIGN);
    an allocator that keeps freed memory (MALLOC_TUNABLES) unless the caller set its own."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return env


def run_guarded(
    target: str,
    request: Json,
    *,
    limits: Limits,
    on_progress: ProgressFn | None = None,
    untrusted_phase: Callable[[Json], bool] | None = None,
    cancel: threading.Event | None = None,
    clock_from_first_progress: bool = False,
) -> Json:
    """Run `target` ("module:function") on `request` in a fresh process.

    A crash or resource kill while the last reported progress satisfies
    `untrusted_phase` is blamed on the input (BadInput); otherwise it is a WorkerFailed.
    Setting `cancel` kills the process (its caller went away) and raises Unavailable.
    With `clock_from_first_progress`, `limits.timeout_s` counts from the job's first
    progress report, once the process is up (its start-up, imports included, has as long
    again): processes started together on a busy machine can take long to import.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.guarded", str(limits.memory_bytes), target],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=worker_environment(),
    )
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        proc.kill()

    def new_timer() -> threading.Timer:
        timer = threading.Timer(limits.timeout_s, kill_on_timeout)
        timer.daemon = True
        timer.start()
        return timer

    timer = new_timer()
    restart_clock = clock_from_first_progress
    finished = threading.Event()
    if cancel is not None:
        threading.Thread(target=_kill_on, args=(cancel, finished, proc), daemon=True).start()
    stderr_tail: list[bytes] = []
    stderr_reader = threading.Thread(target=_drain, args=(proc.stderr, stderr_tail), daemon=True)
    stderr_reader.start()
    last_progress: Json = {}
    outcome: Json | None = None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        for line in proc.stdout:
            message = json.loads(line)
            if "progress" in message:
                if restart_clock and not timed_out.is_set():
                    timer.cancel()
                    timer, restart_clock = new_timer(), False
                last_progress = message["progress"]
                if on_progress is not None:
                    on_progress(last_progress)
            else:
                outcome = message
        proc.wait()
    finally:
        timer.cancel()
        finished.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr_reader.join(timeout=5)
    if outcome is not None and "result" in outcome and proc.returncode == 0:
        result: Json = outcome["result"]
        return result
    stage = last_progress.get("stage", "starting")
    if cancel is not None and cancel.is_set():
        raise errors.Unavailable(f"the job was cancelled while {stage}: its caller went away")
    blame_input = untrusted_phase is not None and untrusted_phase(last_progress)
    if outcome is not None and "error" in outcome:
        kind = _ERROR_TYPES.get(outcome["error"]["type"], errors.WorkerFailed)
        message = outcome["error"]["message"]
        if kind is errors.WorkerFailed and blame_input:
            raise errors.BadInput(f"untrusted input rejected while {stage}: {message}")
        raise kind(message)
    if timed_out.is_set():
        cause = f"ran out of time ({limits.timeout_s:.0f} s) while {stage}"
    elif proc.returncode < 0:
        cause = f"was killed by {signal.Signals(-proc.returncode).name} while {stage}"
    else:
        detail = b"".join(stderr_tail).decode(errors="replace").strip().splitlines()
        cause = f"exited with status {proc.returncode} while {stage}" + (
            f" ({detail[-1]})" if detail else "")
    if blame_input:
        raise errors.BadInput(f"untrusted input made the worker fail: it {cause}; nothing "
                              f"else was affected")
    raise errors.WorkerFailed(f"worker {cause}")


def _kill_on(cancel: threading.Event, finished: threading.Event,
             proc: subprocess.Popen[bytes]) -> None:
    while not finished.is_set():
        if cancel.wait(0.2):
            proc.kill()
            return


def _drain(stream: Any, tail: list[bytes]) -> None:
    for line in stream:
        tail.append(line)
        del tail[:-20]


def _child_main(argv: list[str]) -> int:
    memory_bytes, target = int(argv[0]), argv[1]
    # die with the parent thread, which waits for this process: a daemon killed with -9
    # must not leave its jobs running
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    out = sys.stdout

    def emit(message: Json) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    # keep library chatter off the protocol stream
    sys.stdout = sys.stderr
    try:
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        request = json.loads(sys.stdin.readline())
        result = function(request, lambda progress: emit({"progress": progress}))
        emit({"result": result})
        return 0
    except errors.GimmeError as exc:
        emit({"error": {"type": type(exc).__name__, "message": exc.message}})
        return 1
    except MemoryError:
        emit({"error": {"type": "WorkerFailed", "message": "worker ran out of memory"}})
        return 1
    except Exception as exc:  # reported to the parent, which decides whom to blame
        traceback.print_exc()
        emit({"error": {"type": "WorkerFailed", "message": f"{type(exc).__name__}: {exc}"}})
        return 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
