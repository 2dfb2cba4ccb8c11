"""sae_fast's own format: sae.safetensors + cfg.json (see sae_fast.checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint
from ..sae import SparseAutoencoder
from . import Format, register


def detect(path: Path) -> bool:
    """cfg.json names this format, or only sae.safetensors is there (reading says what lacks)."""
    config = path / checkpoint.CONFIG_FILE
    if not config.is_file():
        return (path / checkpoint.WEIGHTS_FILE).is_file()
    try:
        body = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # reading reports the damage
    return isinstance(body, dict) and body.get("format") == checkpoint.FORMAT


def load(path: Path, backend: str | None) -> SparseAutoencoder:
    config, tensors = checkpoint.read(path)
    try:
        config["dtype"] = getattr(torch, config["dtype"])
        sae = SparseAutoencoder(**config, device="meta", backend=backend)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise checkpoint.CheckpointError(
            f"{path / checkpoint.CONFIG_FILE} does not describe an SAE: {e!r}"
        ) from e
    checkpoint.check_tensors(path, tensors, sae.state_dict())
    sae.load_state_dict(tensors, assign=True)
    return sae


def save(sae: SparseAutoencoder, path: Path) -> None:
    checkpoint.write(path, sae.config(), sae.state_dict())


register(Format("sae_fast", detect, load, save))
