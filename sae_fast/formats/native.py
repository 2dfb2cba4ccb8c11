"""sae_fast's own format: sae.safetensors (or its row shards) + cfg.json (sae_fast.checkpoint)."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint, sae_config
from ..files import read_json
from ..parallel import row_shards
from .folder import check_tensors
from .registry import Config, Format, Tensors, register


def detect(path: Path) -> bool:
    """cfg.json names this format, or only sae.safetensors is there (reading says what lacks)."""
    config = path / checkpoint.CONFIG_FILE
    if not config.exists():
        return (path / checkpoint.WEIGHTS_FILE).exists() or row_shards.has_shards(
            path, checkpoint.SHARD_STEM
        )
    try:
        body = read_json(config, checkpoint.CheckpointError)
    except checkpoint.CheckpointError:
        return True  # reading reports the damage
    return isinstance(body, dict) and body.get("format") == checkpoint.FORMAT


def load(path: Path) -> tuple[Config, Tensors]:
    config, tensors = checkpoint.read(path)
    try:
        config = sae_config.complete(config)
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(
            f"{path / checkpoint.CONFIG_FILE} does not describe an SAE: {e!r}"
        ) from e
    _check_tensors(path, config, tensors)
    return config, tensors


def _check_tensors(path: Path, config: Config, tensors: Tensors) -> None:
    """Raise CheckpointError unless tensors has exactly the names, shapes and dtype that
    config implies (sae_config.tensor_shapes)."""
    where = str(path / checkpoint.WEIGHTS_FILE)
    shapes, dtype = sae_config.tensor_shapes(config), sae_config.dtype(config)
    check_tensors(where, tensors, shapes, dtype, checkpoint.CONFIG_FILE)


def save(config: Config, tensors: Tensors, path: Path) -> None:
    checkpoint.write(path, config, tensors)


register(Format("sae_fast", detect, load, save, files=checkpoint.FILES))
