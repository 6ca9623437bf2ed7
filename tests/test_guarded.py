"""Throwaway worker processes: crashes, memory and time limits stay inside the child."""

from __future__ import annotations

import pytest

from common.errors import BadInput, Exhausted, WorkerFailed
from common.guarded import Json, Limits, run_guarded

LIMITS = Limits(memory_bytes=1 << 30, timeout_s=60)


def test_result_and_progress_come_back() -> None:
    seen: list[Json] = []
    result = run_guarded("tests.guarded_targets:echo", {"value": 7}, limits=LIMITS,
                         on_progress=seen.append)
    assert result == {"echo": 7}
    assert [p["done"] for p in seen] == [1, 2, 3]


def test_segfault_is_reported_not_inherited() -> None:
    with pytest.raises(WorkerFailed, match="SIGSEGV while opening"):
        run_guarded("tests.guarded_targets:crash", {"stage": "opening"}, limits=LIMITS)


def test_crash_in_untrusted_phase_blames_the_input() -> None:
    with pytest.raises(BadInput, match=r"untrusted input made the worker fail.*SIGSEGV"):
        run_guarded("tests.guarded_targets:crash", {"stage": "loading ciphertexts"},
                    limits=LIMITS, untrusted_phase=lambda p: p.get("stage") == "loading "
                                                                          "ciphertexts")


def test_memory_limit_stops_a_runaway_allocation() -> None:
    with pytest.raises(WorkerFailed, match="out of memory"):
        run_guarded("tests.guarded_targets:allocate", {"bytes": 4 << 30},
                    limits=Limits(memory_bytes=512 << 20, timeout_s=60))


def test_time_limit_kills_a_hung_worker() -> None:
    with pytest.raises(WorkerFailed, match=r"ran out of time \(1 s\) while sleeping"):
        run_guarded("tests.guarded_targets:sleep", {"seconds": 30},
                    limits=Limits(memory_bytes=1 << 30, timeout_s=1))


def test_the_clock_can_start_at_the_first_progress_report() -> None:
    """A compile worker's limit counts once it is up: 4 s in all, 2 s after its first
    report, within 3 s."""
    request = {"before": 2.0, "after": 2.0}
    assert run_guarded("tests.guarded_targets:slow_start", request,
                       limits=Limits(timeout_s=3), clock_from_first_progress=True) == {}
    with pytest.raises(WorkerFailed, match=r"ran out of time \(3 s\) while working"):
        run_guarded("tests.guarded_targets:slow_start", request, limits=Limits(timeout_s=3))


def test_domain_errors_keep_their_type() -> None:
    with pytest.raises(Exhausted, match="no budget left"):
        run_guarded("tests.guarded_targets:refuse", {}, limits=LIMITS)
