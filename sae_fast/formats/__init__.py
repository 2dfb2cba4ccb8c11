"""Checkpoint formats: sae_fast's own and the layouts other SAE libraries save.

Each format says whether a path holds one of its checkpoints (detect), loads it as a
SparseAutoencoder computing the same function, and, where its layout can hold our SAE, saves
one. SparseAutoencoder.load and .save dispatch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..sae import SparseAutoencoder

Loader = Callable[[Path, str | None], SparseAutoencoder]


@dataclass(frozen=True)
class Format:
    """name; detect(path) -> bool; load(path, backend) -> SAE (any device, eval mode);
    save(sae, path) or None when the layout cannot hold an SAE of ours."""

    name: str
    detect: Callable[[Path], bool]
    load: Loader
    save: Callable[[SparseAutoencoder, Path], None] | None = None


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    _FORMATS[fmt.name] = fmt


def readable() -> list[str]:
    return list(_FORMATS)


def writable() -> list[str]:
    return [name for name, fmt in _FORMATS.items() if fmt.save is not None]


def detect(path: str | Path) -> str:
    """The name of the format at path; CheckpointError saying what was found otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    for name, fmt in _FORMATS.items():
        if fmt.detect(path):
            return name
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    raise CheckpointError(
        f"{path} is not a checkpoint sae_fast reads (formats: {', '.join(_FORMATS)}); found {found}"
    )


def _get(name: str, names: list[str]) -> Format:
    if name not in names:
        raise CheckpointError(f"format must be one of {names}, got {name!r}")
    return _FORMATS[name]


def load(
    path: str | Path,
    format: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> SparseAutoencoder:
    """The SAE at path (format detected when None), in eval mode, on device in dtype."""
    fmt = _get(format or detect(path), readable())
    sae = fmt.load(Path(path), backend)
    return sae.to(device=device, dtype=dtype).eval()


def save(sae: SparseAutoencoder, path: str | Path, format: str = "sae_fast") -> None:
    """Write sae at path in format."""
    _get(format, writable()).save(sae, Path(path))


def _register_all() -> None:
    # Each module registers its format; detectors recognise disjoint layouts.
    from . import dictionary_learning, native, openai, saelens, sparsify  # noqa: F401


_register_all()
