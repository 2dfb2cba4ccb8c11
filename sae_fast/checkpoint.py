"""The sae_fast checkpoint folder: sae.safetensors + cfg.json, written atomically.

An SAE sharded by latents may be stored instead as sae-0000i-of-0000n.safetensors with
sae.safetensors.index.json (parallel/row_shards.py), each shard written by the process that
holds it; reading gives the same (config, tensors) as the single file.

cfg.json holds {"format": "sae_fast", "format_version": N, ...hyperparameters}; the weights
are stored bit-exactly by safetensors. Reading checks both files and says what is wrong:
missing, truncated or corrupt, another format, a newer version (the tensors against the
config: the sae_fast format, sae_fast.formats.native).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .files import atomic_path, check_regular, read_failure, read_json, save_safetensors
from .parallel import row_shards
from .sae_config import DEFAULTS, OPTIONAL

FORMAT = "sae_fast"
FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
SHARD_STEM = "sae"  # sharded weights: row_shards files of this stem instead of WEIGHTS_FILE
FILES = (WEIGHTS_FILE, CONFIG_FILE, row_shards.index_name(SHARD_STEM),
         row_shards.shard_name(SHARD_STEM, 0, 1).replace("00001", "?????"))  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged or does not match its config."""


def read_stamped_json(path: Path, fmt: str, version: int, error: type[ValueError]) -> dict:
    """The JSON object in path, which must carry "format": fmt and "format_version" <= version.

    Anything else raises `error` saying what is wrong: not JSON, another format, a version
    newer than this sae_fast reads.
    """
    body = read_json(path, error)
    if not isinstance(body, dict) or body.get("format") != fmt:
        raise error(f"{path} is not a {fmt} file (no format field)")
    found = body.get("format_version")
    if not isinstance(found, int) or found > version:
        raise error(f"{path} has format_version {found!r}; this sae_fast reads up to {version}")
    return body


def write(path: str | Path, config: dict, tensors: dict[str, Tensor]) -> None:
    """Write tensors and config into folder path: weights first, then cfg.json."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        body = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_safetensors(body, tmp, meta)
    write_config(folder, config)


def write_config(folder: Path, config: dict) -> None:
    """cfg.json of config, stamped with the format (after the weights, single or sharded)."""
    with atomic_path(folder / CONFIG_FILE) as tmp:
        # A plain SAE's cfg.json omits the newer fields, so older sae_fast versions read it.
        mine = {k: v for k, v in config.items() if k not in OPTIONAL or v != DEFAULTS[k]}
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **mine}
        tmp.write_text(json.dumps(body, indent=2) + "\n")


def read(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict, dict[str, Tensor]]:
    """Read folder path -> (config without the format fields, tensors on device)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    sharded = row_shards.has_shards(folder, SHARD_STEM)
    for name in (CONFIG_FILE, *(() if sharded else (WEIGHTS_FILE,))):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder} has no {name}")
        check_regular(folder / name, CheckpointError)
    config = read_config(folder)
    if sharded:
        tensors = row_shards.RowShards(folder, SHARD_STEM, CheckpointError).read_all(device)
    else:
        try:
            tensors = load_file(folder / WEIGHTS_FILE, device=str(device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(read_failure(folder / WEIGHTS_FILE, e)) from e
    return config, tensors


def read_config(folder: Path) -> dict:
    """cfg.json of folder without the format fields."""
    config = read_stamped_json(folder / CONFIG_FILE, FORMAT, FORMAT_VERSION, CheckpointError)
    return {k: v for k, v in config.items() if k not in ("format", "format_version")}
