"""Progress display: rich bars on a terminal, silence everywhere else.

Long work outside Lightning (preprocessing, word2vec, evaluation) goes through :func:`track` or
:func:`progress`; training picks its Lightning bar with :func:`progress_bar` (the
``callbacks.progress_bar`` node). Bars are drawn only when stdout is a terminal, so CI logs,
SLURM output files and pipes get no control characters. ``JOINTGEN_PROGRESS=1`` forces bars on,
``JOINTGEN_PROGRESS=0`` turns them off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
PROGRESS_BARS = ("auto", "rich", "tqdm", "none")


def interactive(stream=None) -> bool:
    """True when bars should be drawn: ``JOINTGEN_PROGRESS`` if set, else whether ``stream``
    (stdout by default) is a terminal that is not ``TERM=dumb``."""
    env = os.environ.get("JOINTGEN_PROGRESS")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "off", "no")
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


@contextmanager
def progress(
    description: str, total: float | None = None, disable: bool | None = None
) -> Iterator[Callable[[float], None]]:
    """A rich progress task; yields ``advance(n=1)``. ``total=None`` shows a count and rate.

    Args:
        description: text left of the bar.
        total: units of the whole task, or None when unknown.
        disable: force off (True) or on (False); None: :func:`interactive`.
    """
    if disable if disable is not None else not interactive():
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None:  # unknown length: a spinner and a count instead of a bar
        count = TextColumn("{task.completed:,.0f}")
        columns = [SpinnerColumn(), TextColumn("{task.description}"), count, TimeElapsedColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def track(
    iterable: Iterable[T],
    description: str,
    total: float | None = None,
    disable: bool | None = None,
) -> Iterator[T]:
    """Iterate ``iterable`` with a rich bar (see :func:`progress`); ``total`` defaults to
    ``len(iterable)`` when it has one."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress(description, total, disable) as advance:
        for item in iterable:
            yield item
            advance(1)


def progress_bar(kind: str = "auto", refresh_rate: int = 1, log_refresh_rate: int = 50):
    """The Lightning progress-bar callback of ``callbacks.progress_bar``.

    Args:
        kind: ``rich`` (RichProgressBar), ``tqdm``, ``none`` (no bar), or ``auto``: rich on a
            terminal, otherwise tqdm refreshed every ``log_refresh_rate`` steps, so log files
            get a line every so often instead of thousands of redraws.
        refresh_rate: steps between redraws on a terminal.
        log_refresh_rate: steps between updates when stdout is not a terminal.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if kind not in PROGRESS_BARS:
        raise ValueError(
            f"callbacks.progress_bar.kind must be one of {PROGRESS_BARS}, got {kind!r}"
        )
    tty = interactive()
    if kind == "auto":
        kind = "rich" if tty else "tqdm"
    if kind == "rich":
        return RichProgressBar(refresh_rate=refresh_rate)
    bar = TQDMProgressBar(refresh_rate=refresh_rate if tty else log_refresh_rate)
    if kind == "none":
        bar.disable()  # a disabled bar keeps Lightning from adding its default one
    return bar
