"""Cost of one call: wall time and peak memory above the pre-call baseline.

CUDA: the allocator's peak. CPU: torch keeps no allocator statistics, so we read the process's resident-set
high-water mark (VmHWM) after trimming the heap and resetting the mark through /proc/self/clear_refs.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Callable

import torch


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_cpu_peak() -> int | None:
    """Trim freed heap, reset VmHWM to the current RSS and return that RSS in kB (None where unsupported)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_kb("VmRSS")
    except OSError:
        return None


def measure(fn: Callable[[], object], device: torch.device | str, repeats: int = 3) -> tuple[float, float | None]:
    """(ms per call, peak MB above baseline) for `fn`, after one warm-up call."""
    device = torch.device(device)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_cpu_peak()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = None if base is None else max(_proc_status_kb("VmHWM") - base, 0) / 1024
    return (time.perf_counter() - start) * 1000 / repeats, peak
