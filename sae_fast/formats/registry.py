"""The format registry: each format module registers itself; detection, loading, saving."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import CheckpointError
from ..files import atomic_folder, read_stable

Config = dict[str, Any]  # an SAE config, as sae_fast.sae_config describes it
Tensors = dict[str, Tensor]  # its tensors by name, in our layout, on the CPU


@dataclass(frozen=True)
class Format:
    """name; detect(path) -> bool; load(path) -> (config, tensors), checked against each
    other; save(config, tensors, path), or None when the layout cannot hold an SAE of ours;
    files: the names (or fnmatch patterns) save writes in a folder; saves_file(path):
    whether save writes the single file path rather than a folder; kind: what the layout
    holds, "sae" (sae_fast.sae_config) or "clt" (a cross-layer transcoder,
    sae_fast.clt.config); activations: those its save holds (None: every one)."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], tuple[Config, Tensors]]
    save: Callable[[Config, Tensors, Path], None] | None = None
    files: tuple[str, ...] = ()
    saves_file: Callable[[Path], bool] = lambda path: False
    kind: str = "sae"
    activations: tuple[str, ...] | None = None


KINDS = {"sae": "an SAE", "clt": "a cross-layer transcoder"}
_FORMATS: dict[tuple[str, str], Format] = {}


def register(fmt: Format) -> None:
    _FORMATS[fmt.kind, fmt.name] = fmt


def _of(kind: str) -> dict[str, Format]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return {name: fmt for (k, name), fmt in _FORMATS.items() if k == kind}


def holds_activation(format: str, activation: str, kind: str = "sae") -> bool:
    """Whether the layout format (one writable for kind) saves that activation."""
    held = _get(format, kind, writable(kind)).activations
    return held is None or activation in held


def readable(kind: str = "sae") -> list[str]:
    return list(_of(kind))


def writable(kind: str = "sae") -> list[str]:
    return [name for name, fmt in _of(kind).items() if fmt.save is not None]


def detect(path: str | Path, kind: str = "sae") -> str:
    """The name of the format at path; CheckpointError saying what was found otherwise (and
    when path holds another kind, which kind and how it loads)."""
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as e:  # a loop of links, a name too long
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise CheckpointError(f"{path} cannot be read: permission denied")
    found = _found(path)
    if found is not None:
        other, name = found
        if other == kind:
            return name
        loader = "CrossLayerTranscoder" if other == "clt" else "SparseAutoencoder"
        raise CheckpointError(
            f"{path} holds {KINDS[other]} ({name} layout), not {KINDS[kind]}: load it "
            f"with sae_fast.{loader}.load"
        )
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    raise CheckpointError(
        f"{path} is not a checkpoint sae_fast reads (formats: {', '.join(_of(kind))}); "
        f"found {found}"
    )


def _found(path: Path) -> tuple[str, str] | None:
    """(kind, name) of the first format that detects path, or None."""
    # The CLT layouts first: SAELens's detector also takes llamascopium's weights file name.
    for kind in ("clt", "sae"):
        for name, fmt in _of(kind).items():
            if fmt.detect(path):
                return kind, name
    return None


def kind_of(path: str | Path) -> str:
    """What the folder path holds: "clt" where a cross-layer transcoder's layout detects it,
    else "sae" (whose loading says what is wrong, if anything is)."""
    path = Path(path)
    found = _found(path) if path.is_dir() else None
    return found[0] if found else "sae"


def _get(name: str, kind: str, names: list[str]) -> Format:
    if name not in names:
        raise CheckpointError(f"format must be one of {names}, got {name!r}")
    return _FORMATS[kind, name]


def load(path: str | Path, format: str | None = None, kind: str = "sae") -> tuple[Config, Tensors]:
    """(config, tensors) of the SAE (kind "clt": the cross-layer transcoder) at path (format
    detected when None), all from one save even while another process saves over it
    (files.read_stable)."""
    path = Path(path)

    def read() -> tuple[Config, Tensors]:
        return _get(format or detect(path, kind), kind, readable(kind)).load(path)

    try:
        return read_stable(path, read)
    except PermissionError as e:
        raise CheckpointError(f"{e.filename or path} cannot be read: permission denied") from None
    except OSError as e:  # a loop of links, a name too long, an I/O error
        raise CheckpointError(f"{e.filename or path} cannot be read: {e.strerror or e}") from None


# The layouts with a field for a Matryoshka SAE's prefix sizes; those that hold transcoders
# and skip connections.
MATRYOSHKA_FORMATS = ("sae_fast", "dictionary_learning", "saelens")
TRANSCODER_FORMATS = ("sae_fast", "saelens", "sparsify")


def save(
    config: Config, tensors: Tensors, path: str | Path, format: str = "sae_fast", kind: str = "sae"
) -> None:
    """Write the SAE (kind "clt": the cross-layer transcoder) that config and tensors describe
    at path in format.

    A folder appears whole (files.atomic_folder): readers see the SAE saved before or this
    one. It replaces a folder that holds only SAE files, and refuses to delete anything else.
    """
    fmt, path = _get(format, kind, writable(kind)), Path(path)
    if kind == "sae":
        _check_holds(config, format)
    if fmt.saves_file(path):
        fmt.save(config, tensors, path)
        return
    try:
        with atomic_folder(path, _sae_files()) as tmp:
            fmt.save(config, tensors, tmp)
    except FileExistsError as e:
        raise CheckpointError(str(e)) from None


def _check_holds(config: Config, format: str) -> None:
    """CheckpointError unless the layout format holds what the SAE config needs."""
    if config.get("matryoshka") is not None and format not in MATRYOSHKA_FORMATS:
        # The code is a plain TopK one, but the nested prefixes would be lost without a word.
        raise CheckpointError(
            f"this is a Matryoshka SAE (prefixes {config['matryoshka']}); the {format} layout "
            "has no field for its prefix sizes: save it as sae_fast"
        )
    extra = [name for name in ("transcoder", "skip_connection") if config.get(name)]
    if extra and format not in TRANSCODER_FORMATS:
        # It would load back as a plain SAE computing something else.
        raise CheckpointError(
            f"this SAE has {' and '.join(extra)}, which the {format} layout cannot hold: save "
            f"it as {', '.join(TRANSCODER_FORMATS)}"
        )


def _sae_files() -> set[str]:
    """The names (patterns) any format writes in an SAE folder: what a save may replace."""
    return {name for fmt in _FORMATS.values() for name in fmt.files}
