"""The folder layout SAELens and sparsify share: a safetensors weights file beside cfg.json.

Reading turns every problem (a missing file, a config that is not a JSON object, truncated
weights, missing or unexpected tensors, a field of the wrong type) into a CheckpointError that
names the file; writing is atomic per file, weights first and then the config that describes
them, as sae_fast's own checkpoints are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..checkpoint import CONFIG_FILE, CheckpointError
from ..files import atomic_path, check_regular, read_failure, read_json, save_safetensors
from ..validation import check_int


def read_config(folder: Path) -> dict[str, Any]:
    """folder/cfg.json, which must hold a JSON object."""
    path = folder / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}")
    body = read_json(path, CheckpointError)
    if not isinstance(body, dict):
        raise CheckpointError(f"{path} holds a JSON {type(body).__name__}, not an object")
    return body


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file at path, on the CPU."""
    if not path.exists():
        raise CheckpointError(f"{path.parent} has no {path.name}")
    check_regular(path, CheckpointError)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(read_failure(path, e)) from e


def check_names(where: str, tensors: dict[str, Tensor], expected: Iterable[str]) -> None:
    """Raise CheckpointError unless tensors holds exactly the names in expected."""
    expected = set(expected)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise CheckpointError(f"{where}: missing tensors {missing}, unexpected tensors {extra}")


def check_tensors(
    where: str,
    tensors: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    config: str = "the config",
) -> None:
    """Raise CheckpointError unless tensors has exactly the names of shapes, each of its shape
    and of dtype: what config (named so in the message) implies."""
    check_names(where, tensors, shapes)
    for name, shape in shapes.items():
        got = tensors[name]
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise CheckpointError(
                f"{where}: {name} is {tuple(got.shape)} {got.dtype} but {config} implies "
                f"{shape} {dtype}"
            )


def integer(where: str, name: str, value: Any, minimum: int = 1) -> int:
    """A config field that must be an integer >= minimum (an integral float such as 32.0 too)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(value, f"{where}: {name}", minimum=minimum, error=CheckpointError)


def positive(where: str, name: str, value: Any) -> float:
    """A config field that must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise CheckpointError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def flag(where: str, name: str, value: Any) -> bool:
    """A config field that must be true or false."""
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def write(
    folder: Path,
    weights_file: str,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    metadata: dict[str, str] | None = None,
    config_file: str = CONFIG_FILE,
) -> None:
    """Write tensors to folder/weights_file, then config to folder/config_file (cfg.json),
    each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder / weights_file, tensors, metadata)
    with atomic_path(folder / config_file) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def write_weights(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (on the CPU, contiguous) to the safetensors file path, atomically."""
    with atomic_path(path) as tmp:
        body = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        save_safetensors(body, tmp, metadata)
