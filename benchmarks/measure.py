"""Timing and peak-memory measurement on CPU and CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def paired_ms(
    fn: Callable[[], object], floor: Callable[[], object], device: str, repeats: int
) -> tuple[float, float, float]:
    """Time fn and floor alternately, repeats times each after a warm-up of both.

    Returns (median ms of fn, median ms of floor, median of the per-pair ratios fn/floor): a
    slow spell of a shared machine hits both halves of a pair, so the ratio stays steady.
    """
    fn(), floor()
    pairs = []
    for _ in range(repeats):
        pair = []
        for f in (fn, floor):
            synchronize(device)
            start = time.perf_counter()
            f()
            synchronize(device)
            pair.append(1e3 * (time.perf_counter() - start))
        pairs.append(pair)
    ms, floor_ms = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    return ms, floor_ms, statistics.median(a / b for a, b in pairs)


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
