"""Tensors split by rows across safetensors files, with an index: an SAE or a training state
sharded by latents, written by each shard's process and read back in any other split.

STEM-00001-of-00002.safetensors holds rows [offset, offset + rows) of every row tensor (those
whose first dimension is n_rows, the latents); the first file also holds the whole tensors
(b_dec, scalars). STEM.safetensors.index.json says which file holds which rows:

    {"format": "sae_fast-row-shards", "format_version": 1, "n_rows": m,
     "row_tensors": ["W_enc", ...], "whole_tensors": ["b_dec", ...],
     "shards": [{"file": "STEM-00001-of-00002.safetensors", "offset": 0, "rows": 512}, ...]}

Like transformers' sharded checkpoints, but a tensor may span files: a process reads only
the rows it holds (safetensors slices), whichever split wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..files import atomic_path, check_regular, read_failure, read_json, save_safetensors

FORMAT = "sae_fast-row-shards"
FORMAT_VERSION = 1


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def shard_name(stem: str, shard: int, shards: int) -> str:
    return f"{stem}-{shard + 1:05d}-of-{shards:05d}.safetensors"


def write_shard(
    folder: str | Path,
    stem: str,
    rows: dict[str, Tensor],
    whole: dict[str, Tensor],
    shard: int,
    shards: int,
    offset: int,
) -> None:
    """Write this shard's rows (each (rows, ...), the latents from offset on) and, from shard
    0, the whole tensors. The file records its own range, which a reader holds to the index."""
    body = {**rows, **(whole if shard == 0 else {})}
    body = {name: t.detach().contiguous().cpu() for name, t in body.items()}
    size = next(iter(rows.values())).shape[0] if rows else 0
    with atomic_path(Path(folder) / shard_name(stem, shard, shards)) as tmp:
        save_safetensors(body, tmp, {"format": FORMAT, "offset": str(offset), "rows": str(size)})


def write_index(
    folder: str | Path,
    stem: str,
    n_rows: int,
    row_names: list[str],
    whole_names: list[str],
    splits: list[tuple[int, int]],
) -> None:
    """The index of shards written by write_shard; splits: (offset, rows) of each shard."""
    shards = [
        {"file": shard_name(stem, i, len(splits)), "offset": offset, "rows": size}
        for i, (offset, size) in enumerate(splits)
    ]
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "n_rows": n_rows,
        "row_tensors": sorted(row_names),
        "whole_tensors": sorted(whole_names),
        "shards": shards,
    }
    with atomic_path(Path(folder) / index_name(stem)) as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n")


def has_shards(folder: str | Path, stem: str) -> bool:
    """Whether folder holds an index of STEM row shards."""
    return (Path(folder) / index_name(stem)).exists()


class RowShards:
    """Read access to the tensors a folder's STEM index lists; error: the exception to raise
    (naming the file) when the index or a shard is missing, damaged or inconsistent."""

    def __init__(self, folder: str | Path, stem: str, error: type[Exception] = ValueError) -> None:
        self.folder, self.error = Path(folder), error
        path = self.folder / index_name(stem)
        check_regular(path, error)
        body = read_json(path, error)
        try:
            if body["format"] != FORMAT or body["format_version"] > FORMAT_VERSION:
                raise error(f"{path} is not a {FORMAT} index of version <= {FORMAT_VERSION}")
            self.n_rows = int(body["n_rows"])
            self.row_names = list(body["row_tensors"])
            self.whole_names = list(body["whole_tensors"])
            self.shards = [(s["file"], int(s["offset"]), int(s["rows"])) for s in body["shards"]]
        except (KeyError, TypeError) as e:
            raise error(f"{path} is not a {FORMAT} index: {e!r}") from None
        files = [file for file, _, _ in self.shards]
        twice = sorted({file for file in files if files.count(file) > 1})
        if twice:
            raise error(f"{path}: shard file {twice[0]} backs more than one row range")
        self._checked: set[str] = set()
        covered = 0
        for file, offset, size in self.shards:
            if Path(file).name != file:
                raise error(f"{path}: shard file {file!r} is not a name in the folder")
            if offset != covered or size < 0:
                raise error(f"{path}: {file} starts at row {offset}, expected {covered}")
            covered += size
        if covered != self.n_rows or not self.shards:
            raise error(f"{path}: the shards hold {covered} rows, not n_rows={self.n_rows}")

    @property
    def names(self) -> list[str]:
        return self.row_names + self.whole_names

    def _open(self, file: str):
        """The shard file, once checked: it records the rows the index says it holds
        (files written before shards recorded their range are taken at the index's word)."""
        path = self.folder / file
        check_regular(path, self.error)
        try:
            opened = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise self.error(read_failure(path, e)) from e
        if file not in self._checked:
            meta = opened.metadata() or {}
            _, offset, size = next(s for s in self.shards if s[0] == file)
            recorded = (meta.get("offset"), meta.get("rows"))
            if recorded != (None, None) and recorded != (str(offset), str(size)):
                raise self.error(
                    f"{path} holds rows from {recorded[0]} ({recorded[1]} of them); the index "
                    f"says from {offset} ({size})"
                )
            self._checked.add(file)
        return opened

    def rows(self, name: str, offset: int, size: int, device: torch.device | str = "cpu") -> Tensor:
        """Rows [offset, offset + size) of row tensor name, from whichever shards hold them."""
        if name not in self.row_names:
            raise self.error(f"{self.folder}: no row tensor {name!r}")
        if not 0 <= offset <= offset + size <= self.n_rows:
            raise self.error(f"{self.folder}: rows [{offset}, {offset + size}) of {self.n_rows}")
        parts = []
        for file, start, count in self.shards:
            lo, hi = max(offset, start), min(offset + size, start + count)
            if lo >= hi:
                continue
            with self._open(file) as f:
                try:
                    piece = f.get_slice(name)
                    found = piece.get_shape()[0]
                    if found != count:
                        raise self.error(f"{self.folder / file}: {name!r} has {found} rows, "
                                         f"the index says {count}")  # fmt: skip
                    parts.append(piece[lo - start : hi - start])
                except (SafetensorError, KeyError) as e:
                    raise self.error(f"{self.folder / file}: {name!r}: {e}") from e
        if not parts:  # an empty range: the dtype and trailing shape from the first shard
            with self._open(self.shards[0][0]) as f:
                parts.append(f.get_slice(name)[0:0])
        return torch.cat(parts).to(device)

    def whole(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """Tensor name whole: a whole tensor, or all the rows of a row tensor."""
        if name in self.row_names:
            return self.rows(name, 0, self.n_rows, device)
        if name not in self.whole_names:
            raise self.error(f"{self.folder}: no tensor {name!r}")
        with self._open(self.shards[0][0]) as f:
            try:
                return f.get_tensor(name).to(device)
            except (SafetensorError, KeyError) as e:
                raise self.error(f"{self.folder / self.shards[0][0]}: {name!r}: {e}") from e

    def read_all(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Every tensor whole, by name."""
        return {name: self.whole(name, device) for name in self.names}
