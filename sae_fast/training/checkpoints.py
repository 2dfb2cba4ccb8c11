"""Training checkpoints: run_dir/checkpoints/step-00000100/ holding the SAE and the run's state.

Each folder holds the SAE as `sae/` would be at that step (sae.safetensors + cfg.json, input
scale folded in: any loader reads it as an SAE for raw activations) and train_state.pt
(optimizer, scheduler, step, latent counters, RNG states, data position, input scale, config,
and the training-time values of the few tensors folding changed, so resuming is exact). A
folder appears whole (files.atomic_folder) and old ones vanish whole (files.remove_folder),
so a crash leaves complete checkpoints and hidden scratch folders that the next run removes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import checkpoint
from ..files import atomic_folder, atomic_path, remove_folder, save_torch

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


def save(
    root: str | Path, step: int, sae_config: dict, sae_tensors: dict, state: dict, keep: int
) -> Path:
    """Write checkpoint `step` under root and prune to the newest `keep`; returns its folder."""
    root = Path(root)
    final = root / folder_name(step)
    if final.exists():  # this step is already saved (periodic save, then exit)
        return final
    with atomic_folder(final) as tmp:
        checkpoint.write(tmp, sae_config, sae_tensors)
        with atomic_path(tmp / STATE_FILE) as path:
            save_torch(state, path)
    for old in list_checkpoints(root)[:-keep]:
        remove_folder(old)
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
