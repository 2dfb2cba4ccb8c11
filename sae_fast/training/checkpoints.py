"""Training checkpoints: run_dir/checkpoints/step-00000100/ holding the SAE and the run's state.

Each folder holds sae.safetensors + cfg.json (the SAE as trained, before the input scale is
folded in) and train_state.pt (optimizer, scheduler, step, latent counters, RNG states, data
position, input scale, config). A folder is written under a temporary name, synced and renamed
into place, so a crash leaves either a complete checkpoint or none; only then are the oldest
beyond `keep` deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .. import checkpoint

# A run folder: what the trainer writes, by the names every reader uses.
RUN_CONFIG_FILE = "config.json"  # options, source, input scale
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SAE_DIR = "sae"  # the final SAE, for raw activations
STATE_FILE = "train_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    root: str | Path, step: int, sae_config: dict, sae_tensors: dict, state: dict, keep: int
) -> Path:
    """Write checkpoint `step` under root and prune to the newest `keep`; returns its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(step)
    if final.exists():  # this step is already saved (periodic save, then exit)
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        checkpoint.write(tmp, sae_config, sae_tensors)
        with checkpoint.atomic_path(tmp / STATE_FILE) as path:
            torch.save(state, path)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def load(folder: str | Path, device: torch.device | str) -> tuple[dict, dict, dict]:
    """(sae config, sae tensors, state) of a checkpoint folder."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise checkpoint.CheckpointError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    config, tensors = checkpoint.read(folder, device=device)
    try:
        state = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
    except Exception as e:  # a damaged file raises many kinds of errors
        raise checkpoint.CheckpointError(f"{folder / STATE_FILE} cannot be read: {e!r}") from e
    return config, tensors, state
