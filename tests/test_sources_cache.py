"""On-disk activation caches: writing, manifest checks, streaming and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from models import WIDTH, tiny_bert
from safetensors.torch import load_file, save_file
from source_checks import assert_exact_resume

from sae_fast.sources import (
    CacheSource,
    SourceError,
    cache_from_model,
    model_activations,
    read_manifest,
    token_windows,
    write_cache,
)
from sae_fast.sources.text import documents

D = 6


def numbered(rows: int, chunk: int = 7):
    """Chunks (<= chunk, D) of rows whose every column holds the row's number."""
    ids = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, D)
    return list(ids.split(chunk))


@pytest.fixture
def cache(tmp_path):
    """A 100-row cache in shards of 30: 30, 30, 30, 10."""
    return write_cache(tmp_path / "cache", numbered(120), tokens=100, shard_rows=30, meta={"a": 1})


def test_write_cache_layout(cache):
    manifest = read_manifest(cache)
    assert manifest["format"] == "sae_fast_activations" and manifest["format_version"] == 1
    assert manifest["dtype"] == "float32" and manifest["d_in"] == D
    assert manifest["rows"] == manifest["tokens"] == 100
    assert [s["rows"] for s in manifest["shards"]] == [30, 30, 30, 10]
    assert manifest["shards"][0]["file"] == "shard-00000.safetensors"
    assert manifest["a"] == 1 and "created" in manifest
    stored = torch.cat([load_file(cache / s["file"])["activations"] for s in manifest["shards"]])
    assert torch.equal(stored, torch.cat(numbered(100)))
    assert not list(cache.glob(".*tmp")), "temporary files left behind"


def test_cache_source_epochs_are_permutations(cache):
    source = CacheSource(cache, seed=3)
    assert source.d_in == D
    # Batches of 13 span shard boundaries; each epoch yields every row exactly once.
    rows = torch.cat([source.next_batch(13) for _ in range(20)])[:, 0].long()
    for epoch in (rows[:100], rows[100:200]):
        assert torch.equal(epoch.sort().values, torch.arange(100))
    assert not torch.equal(rows[:100], rows[100:200]), "epochs should be reshuffled"
    assert not torch.equal(rows[:100], torch.arange(100))
    assert source.epoch == 2 and source.shard_pos == 2
    assert torch.equal(rows[:30], CacheSource(cache, seed=3).next_batch(30)[:, 0].long())
    assert not torch.equal(rows[:30], CacheSource(cache, seed=4).next_batch(30)[:, 0].long())
    assert source.next_batch(0).shape == (0, D)


def test_cache_source_exact_resume(cache):
    # Saved mid-shard in epoch 1; the 12 batches after it cross shards and epochs.
    resumed = assert_exact_resume(lambda: CacheSource(cache, seed=1), n=17, before=8, after=12)
    assert resumed.epoch == 3  # 20 batches of 17 rows = 340 rows
    with pytest.raises(SourceError, match="different source"):
        CacheSource(cache, seed=2).load_state_dict(CacheSource(cache, seed=1).state_dict())


def test_cache_dtypes(tmp_path):
    rows = torch.randn(50, D)
    path = write_cache(tmp_path / "c", [rows], tokens=50, dtype=torch.bfloat16, shard_rows=64)
    assert read_manifest(path)["dtype"] == "bfloat16"
    source = CacheSource(path, dtype=torch.float32)
    out = source.next_batch(50)
    assert out.dtype == torch.float32
    assert torch.equal(out.sort(dim=0).values, rows.bfloat16().float().sort(dim=0).values)
    assert CacheSource(path).next_batch(3).dtype == torch.bfloat16
    with pytest.raises(SourceError, match="dtype must be one of"):
        write_cache(tmp_path / "d", [rows], tokens=5, dtype=torch.int32)


def test_cache_from_model_round_trip(tmp_path):
    model, tokenizer = tiny_bert()
    text = tmp_path / "docs.txt"
    text.write_text(
        "\n\n".join(f"document number {i} says hello to the world " * 3 for i in range(8))
    )
    path = cache_from_model(
        tmp_path / "cache",
        model,
        tokenizer,
        "mlp_out.1",
        str(text),
        tokens=150,
        context_size=16,
        batch_size=4,
        shard_rows=64,
    )
    manifest = read_manifest(path)
    assert manifest["rows"] == 150 and manifest["d_in"] == WIDTH
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 22]
    assert manifest["hook"] == "mlp_out.1" and manifest["module"] == "encoder.layer.1.output.dense"
    assert manifest["context_size"] == 16 and manifest["text"] == str(text)
    assert manifest["architecture"] == "BertModel"
    windows = token_windows(tokenizer, documents(text), 16)
    rows = model_activations(model, tokenizer, "mlp_out.1", windows, batch_size=4)
    want = torch.cat([acts for _, acts in rows])[:150]
    stored = torch.cat([load_file(path / s["file"])["activations"] for s in manifest["shards"]])
    assert torch.equal(stored, want)
    source = CacheSource(path)
    assert source.describe()["hook"] == "mlp_out.1" and source.describe()["rows"] == 150
    got = source.next_batch(150)
    assert torch.equal(got[got[:, 0].argsort()], want[want[:, 0].argsort()])


def test_write_cache_warns_when_short_and_checks_input(tmp_path):
    with pytest.warns(UserWarning, match="ran out after 20 of the 50"):
        path = write_cache(tmp_path / "a", numbered(20), tokens=50)
    assert read_manifest(path)["rows"] == 20
    with pytest.raises(SourceError, match="already holds an activation cache"):
        write_cache(path, numbered(20), tokens=5)
    with pytest.raises(SourceError, match="yielded no rows"):
        write_cache(tmp_path / "b", [], tokens=5)
    with pytest.raises(SourceError, match="one width"):
        write_cache(tmp_path / "c", [torch.zeros(3, 4), torch.zeros(3, 5)], tokens=10)
    with pytest.raises(SourceError, match="shard_rows must be a positive int"):
        write_cache(tmp_path / "d", numbered(5), tokens=5, shard_rows=0)
    with pytest.raises(SourceError, match=r"meta must not set .*'rows'"):
        write_cache(tmp_path / "e", numbered(5), tokens=5, meta={"rows": 3})


def _edit_manifest(cache, **changes):
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest


def test_damaged_caches_are_explained(cache, tmp_path):
    with pytest.raises(SourceError, match="nowhere does not exist"):
        CacheSource(tmp_path / "nowhere")
    with pytest.raises(SourceError, match="has no manifest.json"):
        read_manifest(tmp_path)
    shards = _edit_manifest(cache)["shards"]
    _edit_manifest(cache, rows=99)
    with pytest.raises(SourceError, match="do not add up to rows=99"):
        read_manifest(cache)
    _edit_manifest(cache, rows=100, shards=[{**shards[0], "rows": 31}, *shards[1:]])
    with pytest.raises(SourceError, match=r"shard-00000.safetensors holds \[30, 6\] .* \[31, 6\]"):
        read_manifest(cache)
    _edit_manifest(cache, shards=shards)
    save_file({"other": torch.zeros(30, D)}, cache / "shard-00001.safetensors")
    with pytest.raises(SourceError, match="shard-00001.safetensors is truncated, corrupt"):
        read_manifest(cache)
    (cache / "shard-00002.safetensors").unlink()
    (cache / "shard-00001.safetensors").unlink()
    with pytest.raises(SourceError, match="shard shard-00001.safetensors .* is missing"):
        read_manifest(cache)
    _edit_manifest(cache, format_version=2)
    with pytest.raises(SourceError, match="format_version 2"):
        read_manifest(cache)
    _edit_manifest(cache, format="something_else")
    with pytest.raises(SourceError, match="not a sae_fast_activations file"):
        read_manifest(cache)
    (cache / "manifest.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        read_manifest(cache)


@pytest.mark.gpu
def test_cache_source_on_cuda(cache):
    cpu, gpu = CacheSource(cache, seed=1), CacheSource(cache, seed=1, device="cuda")
    for _ in range(9):
        batch = gpu.next_batch(17)
        assert batch.device.type == "cuda"
        assert torch.equal(batch.cpu(), cpu.next_batch(17))
