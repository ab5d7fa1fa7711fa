"""Time and peak memory of a piece of work: the one home for the benchmarks' measurements.

Peak memory:
    CUDA  torch.cuda.max_memory_allocated after reset_peak_memory_stats (the allocator's peak)
    CPU   the process's peak resident set: on Linux the kernel's VmHWM, reset to the current
          resident set through /proc/self/clear_refs, so the peak of just the measured work is
          seen; elsewhere getrusage's ru_maxrss, the peak since the process started
`PeakMemory` reports the peak and its increase over the memory in use when it started.
"""
from __future__ import annotations

import re
import resource
import sys
import time
from typing import Callable

import torch


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def max_rss_bytes() -> int:
    """getrusage's peak resident set since the process started, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so a timer or memory reading covers it; nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the work done inside `with PeakMemory(device) as mem:` (see the module docstring).

    After (or during) the block: mem.peak_bytes(), mem.increase_bytes(), mem.method.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self.start = "cuda max_memory_allocated", torch.cuda.memory_allocated(self.device)
        elif reset_peak_rss():
            self.method, self.start = "VmHWM", _status_kb("VmRSS") * 1024
        else:
            self.method, self.start = "ru_maxrss", max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kb("VmHWM") * 1024 if self.method == "VmHWM" else max_rss_bytes()

    def increase_bytes(self) -> int:
        return max(self.peak_bytes() - self.start, 0)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 0,
               device: torch.device | str = "cpu") -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones, CUDA work included."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times
