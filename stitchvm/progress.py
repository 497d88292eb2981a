"""Progress bars that stay readable in logs: `from stitchvm.progress import tqdm`, a drop-in for `tqdm.auto.tqdm`.

Where the bar's stream (`file=`, by default stderr) is a terminal (or a notebook), it is tqdm.auto's bar unchanged.
Where it is not (a DVC or Dagster log, CI, `2> file`, a pipe), tqdm would redraw the bar with carriage returns up to
ten times a second, which leaves one huge line in the log; instead the bar writes a plain line (no carriage return,
no escape codes) when it starts, at most once every `STITCHVM_PROGRESS_INTERVAL` seconds (default 30) and when it
ends.

`STITCHVM_PROGRESS` picks the behaviour, read when a bar is created:

- unset, empty or `auto`: as above (a live bar on a terminal, plain lines every 30 s otherwise);
- `1` / `on` / `true` / `yes`: always tqdm.auto's own live bar, even where the stream is not a terminal;
- `0` / `off` / `false` / `no`: no bars at all.

`disable=True` (the stages' `--no-progress`) always wins.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time

from tqdm.auto import tqdm as _auto_tqdm

__all__ = ["tqdm", "mode", "LOG_INTERVAL_S"]

LOG_INTERVAL_S = 30.0  # seconds between two lines of a bar in a log (STITCHVM_PROGRESS_INTERVAL overrides)
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def mode() -> str:
    """`auto`, `on` or `off`: STITCHVM_PROGRESS as read now (an unknown value counts as `auto`)."""
    value = os.environ.get("STITCHVM_PROGRESS", "").strip().lower()
    return "on" if value in _ON else "off" if value in _OFF else "auto"


def _interval() -> float:
    try:
        return max(float(os.environ.get("STITCHVM_PROGRESS_INTERVAL", LOG_INTERVAL_S)), 0.0)
    except ValueError:
        return LOG_INTERVAL_S


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _is_notebook() -> bool:
    return any(cls.__name__ == "tqdm_notebook" for cls in _auto_tqdm.__mro__)


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines (and drops cursor escapes)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        for line in _ESCAPES.sub("", text).replace("\r", "\n").split("\n"):
            if line.strip():
                self._stream.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, isatty, …: the wrapped stream's
        return getattr(self._stream, name)


class tqdm(_auto_tqdm):  # noqa: N801 (the name callers know)
    """`tqdm.auto.tqdm` with the log-friendly behaviour of the module docstring; same arguments and methods."""

    def __init__(self, *args, **kwargs):
        self._log_every, self._log_last = None, -math.inf  # log mode: seconds between two lines; the last one's time
        setting = mode()
        if setting == "off":
            kwargs["disable"] = True
        elif setting == "auto" and not kwargs.get("disable") and not _is_notebook():
            stream = kwargs.get("file") or sys.stderr
            if not _is_terminal(stream):
                interval = self._log_every = _interval()
                kwargs.update(file=_Lines(stream), mininterval=interval, maxinterval=max(interval, 10.0),
                              dynamic_ncols=False)
                kwargs.setdefault("ncols", 80)
                kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def refresh(self, nolock=False, lock_args=None):
        """In log mode, at most one line per interval: `set_postfix`/`set_description` refresh on every call."""
        if self._log_every is not None:
            now = time.time()
            if now - self._log_last < self._log_every:
                return
            self._log_last = now
        return super().refresh(nolock=nolock, lock_args=lock_args)
