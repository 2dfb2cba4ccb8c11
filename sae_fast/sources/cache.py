"""On-disk activation caches: safetensors shards + manifest.json, streamed a shard at a time.

Layout of a cache folder:
    shard-00000.safetensors, ...   tensor "activations" (rows, d_in), each written atomically
    manifest.json                  written last: a folder without one is not a finished cache
manifest.json holds format "sae_fast_activations", format_version, dtype, d_in, rows (one per
token, so also tokens), shards [{file, rows, sha256}], created, and what made it (model, hook,
text, context size, ...). The folder is locked while it is written (files.lock_folder). A
cache's identity, which a resumed run must match, is all of that but the creation time: a
cache rebuilt from another model, hook point or text is another cache even at equal shapes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..checkpoint import read_stamped_json
from ..files import (
    atomic_path,
    check_regular,
    clean_stale,
    lock_folder,
    read_failure,
    save_safetensors,
)
from ..options import ACTIVATION_DTYPES, is_int
from ..validation import check_int, dtype_name, parse_dtype
from .base import SourceError, check_batch_size, check_state, part_rows
from .model import model_activations, model_description, token_windows
from .seeds import seeded_generator
from .text import documents

FORMAT = "sae_fast_activations"
CACHE_LOCK = "sae-fast cache writing"  # what holds a cache folder's lock, as messages say
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR = "activations"
DTYPES = {name: parse_dtype(name) for name in ACTIVATION_DTYPES}
_LAYOUT_FIELDS = ("format", "format_version", "dtype", "d_in", "rows", "tokens", "shards")
# safetensors' names of the stored dtypes, to check the shards against the manifest.
_STORED = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_cache(
    out_dir: str | Path,
    activations: Iterable[Tensor],
    *,
    tokens: int,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float32,
    meta: dict | None = None,
) -> Path:
    """Write the first `tokens` rows of activations (chunks (t, d)) as a cache in out_dir.

    Shards hold shard_rows rows (the last one fewer); manifest.json is written last, with meta
    (model, hook point, context size, text source, ...). Warns if activations run out first.
    """
    for name, value in (("tokens", tokens), ("shard_rows", shard_rows)):
        check_int(value, name, error=SourceError)
    if dtype not in DTYPES.values():
        raise SourceError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    meta = dict(meta or {})
    clash = sorted(set(meta) & {*_LAYOUT_FIELDS, "created"})
    if clash:
        raise SourceError(f"meta must not set the manifest's own fields {clash}")
    folder = Path(out_dir)
    with lock_folder(folder, CACHE_LOCK):
        check_new_cache(folder)
        clean_stale(folder)  # shards a killed writer left half-written
        return _write_shards(folder, activations, tokens, shard_rows, dtype, meta)


def check_new_cache(out_dir: str | Path) -> None:
    """A new cache may be written into out_dir: it holds none yet. write_cache checks again,
    holding the folder's lock; a command checks first, before it loads a model."""
    folder = Path(out_dir)
    if (folder / MANIFEST_FILE).exists():
        raise SourceError(f"{folder} already holds an activation cache; choose another out_dir")


def _write_shards(
    folder: Path,
    activations: Iterable[Tensor],
    tokens: int,
    shard_rows: int,
    dtype: torch.dtype,
    meta: dict,
) -> Path:
    shards: list[dict] = []

    def write_shard(rows: Tensor) -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        rows = rows.contiguous()
        with atomic_path(folder / name) as tmp:
            save_safetensors({TENSOR: rows}, tmp)
        digest = hashlib.sha256(rows.view(torch.uint8).numpy()).hexdigest()
        shards.append({"file": name, "rows": rows.shape[0], "sha256": digest})

    pending: list[Tensor] = []
    pending_rows = total = 0
    d_in = None
    for chunk in activations:
        if chunk.ndim != 2 or (d_in is not None and chunk.shape[1] != d_in):
            raise SourceError(
                f"activations must yield (t, d) chunks of one width d, got {tuple(chunk.shape)}"
            )
        d_in = chunk.shape[1]
        chunk = chunk[: tokens - total].detach().to("cpu", dtype)
        pending.append(chunk)
        pending_rows, total = pending_rows + chunk.shape[0], total + chunk.shape[0]
        if pending_rows >= shard_rows:
            block = torch.cat(pending)
            full = pending_rows // shard_rows * shard_rows
            for start in range(0, full, shard_rows):
                write_shard(block[start : start + shard_rows])
            pending, pending_rows = [block[full:]], pending_rows - full
        if total == tokens:
            break
    if pending_rows:
        write_shard(torch.cat(pending))
    if total == 0:
        raise SourceError("activations yielded no rows; nothing to cache")
    if total < tokens:
        warnings.warn(
            f"activations ran out after {total} of the {tokens} requested rows", stacklevel=2
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtype),
        "d_in": d_in,
        "rows": total,
        "tokens": total,
        "shards": shards,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
    }
    with atomic_path(folder / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def cache_from_model(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    documents_spec: str | Path,
    tokens: int,
    context_size: int = 128,
    batch_size: int = 32,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    exclude_special: bool = True,
) -> Path:
    """Cache `tokens` activations of model at hook on documents_spec (in document order)."""
    windows = token_windows(tokenizer, documents(documents_spec), context_size)
    rows = model_activations(model, tokenizer, hook, windows, batch_size, device, exclude_special)
    meta = {
        **model_description(model, hook),
        "context_size": context_size,
        "text": str(documents_spec),
        "exclude_special": exclude_special,
    }
    return write_cache(
        out_dir,
        (acts for _, acts in rows),
        tokens=tokens,
        shard_rows=shard_rows,
        dtype=dtype,
        meta=meta,
    )


def read_manifest(cache_dir: str | Path) -> dict:
    """The checked manifest of the cache in cache_dir; SourceError says what is wrong."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        raise SourceError(f"activation cache folder {folder} does not exist")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise SourceError(f"{folder} has no {MANIFEST_FILE}: not a cache, or its writing stopped")
    manifest = read_stamped_json(path, FORMAT, FORMAT_VERSION, SourceError)
    shards = manifest.get("shards")
    if (
        manifest.get("dtype") not in DTYPES
        or not is_int(manifest.get("d_in"), 1)
        or not is_int(manifest.get("rows"), 1)
        or not isinstance(shards, list)
        or not all(isinstance(s, dict) and is_int(s.get("rows"), 1) for s in shards)
    ):
        raise SourceError(f"{path} lacks a valid dtype, d_in, rows or shards [{{file, rows}}]")
    for shard in shards:
        _check_shard(folder, shard, manifest["d_in"], manifest["dtype"])
    if sum(s["rows"] for s in shards) != manifest["rows"]:
        raise SourceError(f"{path}: shard rows do not add up to rows={manifest['rows']}")
    return manifest


def _check_shard(folder: Path, shard: dict, d_in: int, dtype: str) -> None:
    file = folder / str(shard.get("file"))
    if not file.exists():
        raise SourceError(f"{folder}: shard {shard.get('file')} listed in the manifest is missing")
    check_regular(file, SourceError)
    try:
        with safe_open(file, framework="pt") as f:
            stored = f.get_slice(TENSOR)
            shape, found = stored.get_shape(), stored.get_dtype()
    except (SafetensorError, OSError, KeyError) as e:
        raise SourceError(f"{file} is truncated, corrupt or has no {TENSOR!r} tensor: {e}") from e
    if shape != [shard["rows"], d_in]:
        raise SourceError(
            f"{file} holds {shape} activations but the manifest says [{shard['rows']}, {d_in}]"
        )
    if found != _STORED[dtype]:
        raise SourceError(f"{file} holds {found} activations but the manifest says {dtype}")


class CacheSource:
    """Activations streamed from a cache folder, one shard in memory at a time.

    Each epoch visits the shards in a seeded order and each shard's rows in a seeded order;
    a batch may span shards. The state is (epoch, shard position, row offset): small, exact.
    Data-parallel ranks step through the same order (each loads every shard, as one process
    would) and each copies out only its rows of a batch: the same batches in every layout.
    """

    broadcast_rows = False

    def __init__(
        self,
        cache_dir: str | Path,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.folder = Path(cache_dir)
        self.manifest = read_manifest(self.folder)
        self.shards = self.manifest["shards"]
        self.d_in = self.manifest["d_in"]
        self.seed, self.device = seed, torch.device(device)
        self.dtype = dtype or DTYPES[self.manifest["dtype"]]
        self.epoch = self.shard_pos = self.row_offset = 0
        self._loaded: tuple[tuple[int, int], Tensor, Tensor] | None = None

    def _shard(self) -> tuple[Tensor, Tensor]:
        """The current shard's rows (r, d_in) on device and this epoch's row order (r,)."""
        key = (self.epoch, self.shard_pos)
        if self._loaded is None or self._loaded[0] != key:
            order = torch.randperm(
                len(self.shards), generator=seeded_generator(self.seed, self.epoch)
            )
            index = int(order[self.shard_pos])
            file = self.folder / self.shards[index]["file"]
            try:
                with safe_open(file, framework="pt") as f:
                    # A copy: rows left mapped from the file would die by SIGBUS if the file
                    # were truncated while training.
                    rows = f.get_tensor(TENSOR).to(self.device, copy=True)
            except (SafetensorError, OSError) as e:  # damaged since the manifest was checked
                raise SourceError(read_failure(file, e)) from e
            if tuple(rows.shape) != (self.shards[index]["rows"], self.d_in):
                raise SourceError(f"{file} changed since the cache was opened: {tuple(rows.shape)}")
            perm = torch.randperm(
                rows.shape[0], generator=seeded_generator(self.seed, self.epoch, index)
            ).to(self.device)
            self._loaded = (key, rows, perm)
        return self._loaded[1], self._loaded[2]

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)) -> Tensor:
        """The next n rows: (n, d_in), on device, in dtype; with part=(i, p), only the rows
        part_rows(n, i, p) of them are read and returned (a data-parallel rank's slice)."""
        check_batch_size(n)
        lo, hi = part_rows(n, *part)
        parts = [torch.empty(0, self.d_in, dtype=self.dtype, device=self.device)]
        done = 0
        while done < n:
            rows, perm = self._shard()
            pick = perm[self.row_offset : self.row_offset + n - done]
            mine = pick[max(lo - done, 0) : max(hi - done, 0)]
            parts.append(rows[mine].to(self.dtype))
            done += pick.shape[0]
            self.row_offset += pick.shape[0]
            if self.row_offset == rows.shape[0]:
                self.row_offset, self.shard_pos = 0, self.shard_pos + 1
                if self.shard_pos == len(self.shards):
                    self.shard_pos, self.epoch = 0, self.epoch + 1
        return torch.cat(parts)

    def _identity(self) -> dict:
        """The manifest but its creation time (see the module docstring), seed and dtype."""
        made = {k: v for k, v in self.manifest.items() if k != "created"}
        return {**made, "seed": self.seed, "dtype": str(self.dtype)}

    def state_dict(self) -> dict:
        return {
            "identity": self._identity(),
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "row_offset": self.row_offset,
        }

    def load_state_dict(self, state: dict) -> None:
        identity = self._identity()
        saved = state.get("identity") if isinstance(state, dict) else None
        if isinstance(saved, dict) and "format" not in saved:  # saved before the manifest was
            shards = [{k: s[k] for k in ("file", "rows")} for s in self.shards]
            identity = {"rows": self.manifest["rows"], "d_in": self.d_in, "shards": shards}
            identity |= {"seed": self.seed, "dtype": str(self.dtype)}
        check_state(state, identity)
        self.epoch, self.shard_pos = state["epoch"], state["shard_pos"]
        self.row_offset = state["row_offset"]

    def describe(self) -> dict:
        made_by = {k: v for k, v in self.manifest.items() if k not in _LAYOUT_FIELDS}
        return {
            "kind": "cache",
            "path": str(self.folder),
            "d_in": self.d_in,
            "rows": self.manifest["rows"],
            "dtype": dtype_name(self.dtype),
            "seed": self.seed,
            **made_by,
        }
