"""Progress and log lines: one ``Reporter`` is made by the command line and passed down.

Library code reports through the small protocol below and never builds a display itself:
``reporter.log(text)`` for a line (rich markup allowed), ``with reporter.task(name, total) as task``
for a long loop, then ``task.advance(n, info)`` / ``task.update(completed, info)``. The default,
``Reporter()``, prints log lines as plain text and shows no progress; ``RichReporter`` (the CLI's)
prints through a rich console and draws every open task as one bar of a single live display.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Log = Callable[[str], None]


class Task:
    """A long loop's progress; this one shows nothing."""

    def advance(self, n: float = 1, info: str | None = None) -> None:
        pass

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        pass


class _Deferred(Task):
    def __init__(self, open_task: Callable[[], Task]):
        self._open, self._task = open_task, None

    def start(self) -> Task:
        if self._task is None:
            self._task = self._open()
        return self._task

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self.start().advance(n, info)

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        self.start().update(completed, info)


def _print_plain(text: str) -> None:
    from rich.text import Text

    print(Text.from_markup(text).plain)


class Reporter:
    """Logs lines through ``log`` (default: print, markup removed); shows no progress."""

    def __init__(self, log: Log | None = None):
        self._log = log

    def log(self, text: str) -> None:
        (self._log or _print_plain)(text)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, completed: float = 0) -> Iterator[Task]:
        yield Task()

    def without_progress(self) -> Reporter:
        """The same log, no progress (``--quiet``, or a caller that asked for none)."""
        return Reporter(self.log)

    @contextlib.contextmanager
    def deferred_task(self, description: str, total: float | None = None) -> Iterator[Task]:
        """A task shown only from its first ``start()`` / ``advance()`` / ``update()`` on: a loop that
        may stop before it begins (a dataset locked by another process) draws no bar."""
        with contextlib.ExitStack() as stack:
            yield _Deferred(lambda: stack.enter_context(self.task(description, total)))


def reporter_for(reporter: Reporter | None = None, log: Log | None = None, progress: bool = True) -> Reporter:
    """The reporter a function uses: the one given (else one that logs through ``log``), without
    progress when ``progress`` is False. Lets functions keep their ``log`` / ``progress`` arguments."""
    chosen = reporter if reporter is not None else Reporter(log)
    return chosen if progress else chosen.without_progress()


class _RichTask(Task):
    def __init__(self, progress, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self._progress.update(self._id, advance=n, **fields)

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self._progress.update(self._id, completed=completed, **fields)


class RichReporter(Reporter):
    """Log lines and progress bars on one rich console (the command line's reporter)."""

    def __init__(self, console=None, progress: bool = True):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        super().__init__(self.console.print)
        self._show = progress
        self._display = None
        self._open = 0

    def _bars(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.console)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, completed: float = 0) -> Iterator[Task]:
        if not self._show:
            yield Task()
            return
        if self._display is None:
            self._display = self._bars()
            self._display.start()
        task_id = self._display.add_task(description, total=total, completed=completed, info="")
        self._open += 1
        try:
            yield _RichTask(self._display, task_id)
        finally:
            self._open -= 1
            if self._open == 0:  # the last bar stays on screen, as a record of the stage
                self._display.stop()
                self._display = None
            else:  # an inner loop's bar goes when it ends
                self._display.remove_task(task_id)

    def without_progress(self) -> Reporter:
        return RichReporter(self.console, progress=False)
