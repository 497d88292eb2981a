"""A stage's progress bars as lines of a Dagster run's event log.

The stages draw their bars with `stitchvm.progress.tqdm`, which writes to stderr; where stderr is not a terminal it
writes a plain line when a bar starts, at most every STITCHVM_PROGRESS_INTERVAL seconds (default 30) and when it
ends ("train:  30%|###       | 120/400 [00:14<00:33,  8.50it/s]": the step count, elapsed time and ETA).
`progress_to_log(log)` puts a tee in front of sys.stderr while a stage runs: everything still reaches stderr (the
step's compute log, as on the command line), and the bars' lines also go to `log.info`: Dagster's `context.log`
in a step, Pipes' `pipes.log` in a process launched through Pipes. stitchvm never sees dagster, only a stream that is
not a terminal.
"""
from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager, redirect_stderr
from typing import Iterator, Protocol

from stitchvm.progress import tqdm


class InfoLog(Protocol):
    def info(self, msg: str) -> None: ...


class ProgressTee:
    """A text stream that passes everything to `stream` and sends the lines of stitchvm's bars to `log.info`."""

    def __init__(self, stream, log: InfoLog):
        self._stream, self._log = stream, log
        # bars seen while open: a bar writes its last line after leaving tqdm's set of open bars
        self._bars: weakref.WeakSet = weakref.WeakSet()

    def write(self, text: str) -> int:
        self._stream.write(text)
        for line in text.splitlines():
            if self._is_bar_line(line):
                self._log.info(line.strip())
        return len(text)

    def _is_bar_line(self, line: str) -> bool:
        self._bars.update(bar for bar in list(tqdm._instances) if isinstance(bar, tqdm))
        return any(bar.desc and line.startswith(f"{bar.desc}: ") for bar in list(self._bars))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:  # the bars keep their log format (plain lines) even where stderr is a terminal
        return False

    def __getattr__(self, name):  # encoding, fileno, …: the wrapped stream's
        return getattr(self._stream, name)


@contextmanager
def progress_to_log(log: InfoLog) -> Iterator[None]:
    """While the block runs, the lines of the progress bars it starts also go to `log.info`."""
    with redirect_stderr(ProgressTee(sys.stderr, log)):
        yield
