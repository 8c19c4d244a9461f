"""nnU-Net prints to stdout: while it runs, its output goes to a log file (and, line by line, to a callback)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Iterator


class Tee(io.TextIOBase):
    """stdout replacement while nnU-Net runs: everything goes to a log file; ``on_line`` sees each line."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None = None):
        self.file = path.open("a", encoding="utf-8")
        self.on_line, self.buffer = on_line, ""

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.on_line is not None:
            self.buffer += text
            *lines, self.buffer = self.buffer.split("\n")
            for line in lines:
                self.on_line(line)
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def captured(path: Path, on_line: Callable[[str], None] | None = None) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tee = Tee(path, on_line)
    try:
        with contextlib.redirect_stdout(tee):
            yield
    finally:
        tee.close()
