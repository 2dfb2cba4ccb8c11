"""Timing and peak-memory measurement on CPU and CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn in ms over repeats calls, after warmup calls (device synced)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory fn adds above what was in use before it, in MiB.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS (VmHWM), reset just
    before fn through /proc/self/clear_refs; run it in a process started with
    MALLOC_MMAP_THRESHOLD_ set low (see suites) so freed buffers leave the RSS at once.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def is_oom(error: BaseException) -> bool:
    """Whether error is an out-of-memory failure (CUDA allocator or host allocation)."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )
