"""Progress bars for the long steps (encryption, upload, evaluation, download)."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.protocol import Progress as StepProgress


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Bars:
    """One live display; each task shows a bar, a detail text and the elapsed time."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(TextColumn("{task.description:<30}"), BarColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                  console=console)

    def __enter__(self) -> Bars:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def transfer(self, description: str, total: int) -> Callable[[int], None]:
        task = self._progress.add_task(description, total=total,
                                       detail=f"0 / {_megabytes(total)}")
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            self._progress.update(task, completed=done,
                                  detail=f"{_megabytes(done)} / {_megabytes(total)}")

        return advance

    def count(self, description: str, total: int) -> Callable[[int], None]:
        task = self._progress.add_task(description, total=total, detail=f"0/{total}")
        return lambda done: self._progress.update(task, completed=done,
                                                  detail=f"{done}/{total}")

    def steps(self, description: str) -> Callable[[StepProgress], None]:
        task = self._progress.add_task(description, total=None, detail="waiting")

        def update(progress: StepProgress) -> None:
            detail = progress.stage + (f" {progress.done}/{progress.total}"
                                       if progress.total else "")
            self._progress.update(task, completed=progress.done,
                                  total=progress.total or None, detail=detail)

        return update
