"""Cost of one call: wall time and peak memory above the pre-call baseline.

CUDA: the allocator's peak. CPU: torch keeps no allocator statistics, so we read the process's resident-set
high-water mark (VmHWM) after trimming the heap and resetting the mark through /proc/self/clear_refs.
"""
from __future__ import annotations

import ctypes
import os
import platform
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


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so wall time measures it; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """What a benchmark row ran on: the GPU's name, or the CPU's with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.mb`: the peak above the memory in use on entry
    (None on a CPU without /proc/self/clear_refs)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _reset_cpu_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self.mb = max(_proc_status_kb("VmHWM") - self._base, 0) / 1024


def measure(fn: Callable[[], object], device: torch.device | str, repeats: int = 3) -> tuple[float, float | None]:
    """(ms per call, peak MB above baseline) for `fn`, after one warm-up call."""
    fn()
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
    return (time.perf_counter() - start) * 1000 / repeats, peak.mb
