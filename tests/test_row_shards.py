"""Row shards (sae_fast/parallel/row_shards.py): tensors split by rows across files, read
back in any other split, and the damage a reader must name instead of reading wrong rows."""

from __future__ import annotations

import json

import pytest
import torch

from sae_fast import files
from sae_fast.checkpoint import CheckpointError
from sae_fast.parallel import row_shards
from sae_fast.parallel.row_shards import RowShards, index_name, shard_name, write_index, write_shard


def write(folder, splits, W, b):
    for i, (offset, size) in enumerate(splits):
        rows = {"W": W[offset : offset + size]}
        write_shard(folder, "s", rows, {"b": b}, i, len(splits), offset)
    write_index(folder, "s", W.shape[0], ["W"], ["b"], splits)


def test_rows_written_in_one_split_read_in_any_other(tmp_path):
    W, b = torch.arange(70.0).reshape(10, 7), torch.arange(7.0)
    write(tmp_path, [(0, 4), (4, 3), (7, 3)], W, b)
    shards = RowShards(tmp_path, "s", CheckpointError)
    for offset, size in [(0, 10), (3, 2), (2, 6), (9, 1), (5, 0)]:
        assert torch.equal(shards.rows("W", offset, size), W[offset : offset + size])
    assert torch.equal(shards.whole("b"), b)
    assert set(shards.read_all()) == {"W", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [index_name("s"), *(shard_name("s", i, 3) for i in range(3))]
    )


def test_damage_is_named_not_read(tmp_path):
    W, b = torch.ones(6, 2), torch.zeros(2)
    write(tmp_path, [(0, 3), (3, 3)], W, b)
    index = tmp_path / index_name("s")
    body = json.loads(index.read_text())
    first, second = shard_name("s", 0, 2), shard_name("s", 1, 2)
    # Two row ranges backed by one file, or by each other's files: refused, never read.
    for shards, match in [
        ([{"file": first, "offset": 0, "rows": 3}, {"file": first, "offset": 3, "rows": 3}],
         f"{first} backs more than one row range"),
        ([{"file": second, "offset": 0, "rows": 3}, {"file": first, "offset": 3, "rows": 3}],
         "holds rows from 3 \\(3 of them\\); the index says from 0 \\(3\\)"),
    ]:  # fmt: skip
        index.write_text(json.dumps({**body, "shards": shards}))
        with pytest.raises(CheckpointError, match=match):
            RowShards(tmp_path, "s", CheckpointError).read_all()
    index.write_text(json.dumps(body))
    # A shard holding fewer rows than the index says: its own record, or (a shard written
    # before shards recorded their range) its tensors.
    write_shard(tmp_path, "s", {"W": W[:2]}, {"b": b}, 1, 2, 3)
    with pytest.raises(CheckpointError, match="holds rows from 3 \\(2 of them\\)"):
        RowShards(tmp_path, "s", CheckpointError).rows("W", 0, 6)
    files.save_safetensors({"W": W[:2]}, tmp_path / second, {"format": row_shards.FORMAT})
    with pytest.raises(CheckpointError, match="has 2 rows, the index says 3"):
        RowShards(tmp_path, "s", CheckpointError).rows("W", 0, 6)
    # Shards that do not tile the rows, or a file outside the folder.
    for shards, match in [
        ([{"file": shard_name("s", 0, 2), "offset": 0, "rows": 3}], "hold 3 rows"),
        ([{"file": "../x.safetensors", "offset": 0, "rows": 6}], "not a name in the folder"),
        ([{"file": shard_name("s", 0, 2), "offset": 1, "rows": 5}], "expected 0"),
    ]:
        index.write_text(json.dumps({**body, "shards": shards}))
        with pytest.raises(CheckpointError, match=match):
            RowShards(tmp_path, "s", CheckpointError)
    index.write_text("{")
    with pytest.raises(CheckpointError):
        RowShards(tmp_path, "s", CheckpointError)
    assert row_shards.has_shards(tmp_path, "s") and not row_shards.has_shards(tmp_path, "t")
