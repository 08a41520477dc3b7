"""Live progress on a terminal: one tqdm line for what a variant is doing now (building, loading, scoring its
windows or task items), with the count done of the total, the rate (tokens or items per second) and the time
left.

Off unless a front end turns it on: the plugin when pytest writes to a terminal, `quantgate baseline` when its
standard error is one. Where output is a log (CI), the plugin writes one line per finished variant instead
(session.Progress). The code that does the work only says what it is doing (`stage`) and how far it got
(`advance`); both cost nothing while progress is off.
"""

from __future__ import annotations

import contextlib
from typing import IO, Iterator

_stream: IO[str] | None = None
_bars: list = []


def use(stream: IO[str] | None) -> None:
    """Where the live line is drawn (a terminal); None turns it off."""
    global _stream
    _stream = stream


def enabled() -> bool:
    return _stream is not None


@contextlib.contextmanager
def stage(description: str, total: int | None = None, unit: str = "it") -> Iterator[None]:
    """A live line for the duration of the block; `advance` moves the innermost one."""
    if _stream is None:
        yield
        return
    from tqdm import tqdm

    if not _bars and hasattr(_stream, "begin"):
        _stream.begin()
    bar = tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "tok", file=_stream, leave=False,
               dynamic_ncols=True, mininterval=0.5, position=len(_bars),
               bar_format=None if total is not None else "{desc} ({elapsed})")
    _bars.append(bar)
    try:
        yield
    finally:
        _bars.remove(bar)
        bar.close()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Work inside the block moves no line (scoring that is not part of what the stage counts)."""
    _bars.append(None)
    try:
        yield
    finally:
        _bars.pop()


def advance(n: int, unit: str) -> None:
    """n more tokens ("tok") or items ("item") done: the innermost stage counts them if that is its unit."""
    if _bars and _bars[-1] is not None and _bars[-1].unit == unit:
        _bars[-1].update(n)


class Uncaptured:
    """A file for the live line under pytest: each write suspends pytest's output capture (as pytest's own live
    logging does), so the line reaches the terminal while a test runs, and nothing of it lands in a report."""

    def __init__(self, capture_manager, stream: IO[str], newline=None):
        self._capman, self._stream, self._newline = capture_manager, stream, newline

    def begin(self) -> None:
        """A new live line starts below whatever pytest has written on the current one (its dots)."""
        if self._newline is not None:
            with self._suspended():
                self._newline()

    def write(self, text: str) -> int:
        with self._suspended():
            self._stream.write(text)
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def _suspended(self):
        if self._capman is None:
            return contextlib.nullcontext()
        return self._capman.global_and_fixture_disabled()
