"""The format registry: each format module registers itself; detection, loading, saving."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import CheckpointError

Config = dict[str, Any]  # an SAE config, as sae_fast.sae_config describes it
Tensors = dict[str, Tensor]  # its tensors by name, in our layout, on the CPU


@dataclass(frozen=True)
class Format:
    """name; detect(path) -> bool; load(path) -> (config, tensors), checked against each
    other; save(config, tensors, path), or None when the layout cannot hold an SAE of ours."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], tuple[Config, Tensors]]
    save: Callable[[Config, Tensors, Path], None] | None = None


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


def load(path: str | Path, format: str | None = None) -> tuple[Config, Tensors]:
    """(config, tensors) of the SAE at path (format detected when None)."""
    return _get(format or detect(path), readable()).load(Path(path))


def save(config: Config, tensors: Tensors, path: str | Path, format: str = "sae_fast") -> None:
    """Write the SAE that config and tensors describe at path in format."""
    _get(format, writable()).save(config, tensors, Path(path))
