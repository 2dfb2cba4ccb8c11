"""Which exact GPU encoder runs, the fused kernel or the chunked one, chosen by measurement.

Both give the same code, so the choice changes only speed, and no model predicts it well
enough from the shapes alone. On the first call for a (device, dtype, shape class), each
path runs for a few milliseconds, the faster one wins, and the winner is kept on disk (one
JSON file under the user cache folder) keyed by the device's name, the versions of torch,
triton and sae_fast and the shape class; a new version measures again. One log line says
which won and by how much. SAE_FAST_ENCODER=fused|chunked skips the measurement.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import atomic_path, peek_json
from ..version import VERSION

logger = logging.getLogger("sae_fast")

ENV_VAR = "SAE_FAST_ENCODER"
PATHS = ("fused", "chunked")
CACHE_ENV = "SAE_FAST_CACHE_DIR"
BUDGET_SECONDS = 3e-3  # of timed runs per path, after one untimed run that compiles it
MAX_REPEATS = 20

_chosen: dict[str, str] = {}  # this process's choices, so the file is read once per key


def forget() -> None:
    """Forget this process's choices; the cache file keeps its winners."""
    _chosen.clear()


def overridden() -> str | None:
    """The path SAE_FAST_ENCODER names, or None; ValueError naming the variable otherwise."""
    value = os.environ.get(ENV_VAR, "")
    if value and value not in PATHS:
        raise ValueError(f"{ENV_VAR} must be one of {list(PATHS)}, got {value!r}")
    return value or None


def cache_file() -> Path:
    """Where winners are kept: $SAE_FAST_CACHE_DIR, else $XDG_CACHE_HOME/sae_fast, else
    ~/.cache/sae_fast."""
    folder = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "sae_fast"
    )
    return Path(folder) / "encoder-choice.json"


def key(x: torch.Tensor, W_enc: torch.Tensor, k: int) -> str:
    """The cache key: device name, dtype, versions and the shape class (n rounded up to a
    power of two, since batches vary; d, m and k as they are)."""
    import triton

    name = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
    n = 1 << max(x.shape[0] - 1, 0).bit_length()
    shape = f"n<={n} d={x.shape[1]} m={W_enc.shape[0]} k={k}"
    versions = f"torch {torch.__version__} triton {triton.__version__} sae_fast {VERSION}"
    return f"{name} | {x.dtype} | {versions} | {shape}"


def gpu_seconds(run: Callable[[], object]) -> float:
    """Mean seconds of run() on the current CUDA stream, over about BUDGET_SECONDS."""
    run()  # compiles, and warms the caches
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    run()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    repeats = max(1, min(MAX_REPEATS, int(BUDGET_SECONDS / max(once, 1e-6))))
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def choose(
    cache_key: str,
    paths: dict[str, Callable[[], object]],
    seconds: Callable[[Callable[[], object]], float] = gpu_seconds,
    ruled_out: dict[str, str] | None = None,
) -> str:
    """The name of the faster of paths (name -> a run of it) for cache_key: the override,
    else this process's or the cache file's winner, else measured with seconds() and kept.
    ruled_out: paths known to be slow for this key (name -> why); with one path left it wins
    unmeasured, and one log line says why."""
    named = overridden()
    if named is not None:
        return named
    if cache_key in _chosen:
        return _chosen[cache_key]
    left = [name for name in paths if name not in (ruled_out or {})]
    if len(left) == 1:
        reasons = "; ".join(f"{name}: {why}" for name, why in ruled_out.items())
        logger.info("encoder for %s: %s (%s)", cache_key, left[0], reasons)
        _chosen[cache_key] = left[0]
        return left[0]
    file = cache_file()
    kept = peek_json(file) or {}
    entry = kept.get(cache_key)
    winner = entry.get("winner") if isinstance(entry, dict) else None
    if winner not in paths:
        times = {name: seconds(run) for name, run in paths.items()}
        winner, other = sorted(times, key=times.get)[:2]
        logger.info(
            "encoder for %s: %s (%.3f ms) beats %s (%.3f ms) by %.2fx",
            cache_key, winner, times[winner] * 1e3, other, times[other] * 1e3,
            times[other] / max(times[winner], 1e-12),
        )  # fmt: skip
        kept[cache_key] = {"winner": winner, "seconds": times}
        _write(file, kept)
    _chosen[cache_key] = winner
    return winner


def _write(file: Path, kept: dict) -> None:
    """The cache file, atomically; a cache that cannot be written costs a measurement next
    time, not the run."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            tmp.write_text(json.dumps(kept, indent=1, sort_keys=True))
    except OSError as e:
        logger.warning("encoder choice not kept in %s: %s", file, e)
