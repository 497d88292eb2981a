"""The checkpoint folder of a resumable run (value-model training, alignment): `dir/last/`, never seen half written.

A checkpoint is written whole into `last.tmp/` and swapped in by renames only (`last` → `last.old`, `last.tmp` →
`last`), so a kill at any instant leaves one complete checkpoint: `last`, or `last.old` just before the swap.
Completeness is a marker file written last inside the folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def fresh_tmp(directory: Path) -> Path:
    """An empty `directory/last.tmp/` (whatever a killed save left there removed)."""
    tmp = directory / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(directory: Path) -> None:
    """Make `last.tmp/` the checkpoint `last/`, by renames only."""
    tmp, final, old = directory / "last.tmp", directory / "last", directory / "last.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path | None, marker: str) -> Path | None:
    """The newest complete checkpoint folder (`last`, else `last.old`, holding `marker`), if any."""
    if directory is None:
        return None
    return next((d for d in (directory / "last", directory / "last.old") if (d / marker).is_file()), None)
