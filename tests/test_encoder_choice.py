"""The choice between the fused and the chunked encoder (backends/encoders.py): measured once
per key, kept on disk, measured again for new versions, overridden by SAE_FAST_ENCODER. On
CPU, with fake timings where a GPU would time the paths."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from cases import DEVICE, integer_case, runs_here

from sae_fast import ops
from sae_fast.backends import chunked, encoders

KEY = "NVIDIA H100 80GB HBM3 | torch.bfloat16 | versions | n<=8192 d=2304 m=65536 k=64"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder and process memo, no override."""
    monkeypatch.setenv(encoders.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(encoders.ENV_VAR, raising=False)
    encoders.forget()
    yield tmp_path / "cache" / "encoder-choice.json"
    encoders.forget()


PATHS = {"fused": lambda: "fused", "chunked": lambda: "chunked"}


def fake_seconds(times: dict[str, float]):
    """A timer that reports times[path] for each run and records which paths it timed."""
    timed: list[str] = []

    def seconds(run):
        timed.append(run())
        return times[run()]

    return seconds, timed


def test_measured_once_then_kept(cache, monkeypatch, caplog):
    seconds, timed = fake_seconds({"fused": 2e-3, "chunked": 1e-3})
    with caplog.at_level(logging.INFO, logger="sae_fast"):
        assert encoders.choose(KEY, PATHS, seconds) == "chunked"
    assert sorted(timed) == ["chunked", "fused"]
    assert f"encoder for {KEY}: chunked (1.000 ms) beats fused (2.000 ms) by 2.00x" in caplog.text
    kept = json.loads(cache.read_text())
    assert kept == {KEY: {"winner": "chunked", "seconds": {"fused": 2e-3, "chunked": 1e-3}}}
    assert encoders.choose(KEY, PATHS, seconds) == "chunked"  # this process remembers
    encoders.forget()  # as a new process, which reads the file
    assert encoders.choose(KEY, PATHS, seconds) == "chunked"
    assert len(timed) == 2


def test_new_versions_measure_again(monkeypatch):
    x, W = torch.zeros(100, 8), torch.zeros(32, 8)
    seconds, timed = fake_seconds({"fused": 1e-3, "chunked": 3e-3})
    old = encoders.key(x, W, 4)
    assert encoders.choose(old, PATHS, seconds) == "fused"
    monkeypatch.setattr(encoders, "VERSION", "99.0")
    new = encoders.key(x, W, 4)
    assert new != old and "sae_fast 99.0" in new
    seconds, timed = fake_seconds({"fused": 3e-3, "chunked": 1e-3})
    assert encoders.choose(new, PATHS, seconds) == "chunked"
    assert sorted(timed) == ["chunked", "fused"]
    assert set(json.loads(encoders.cache_file().read_text())) == {old, new}


def test_the_key_is_the_shape_class():
    """n rounds up to a power of two (batches vary); d, m, k and the dtype count as they are."""
    W = torch.zeros(32, 8)

    def key(n, k=4, dtype=torch.float32):
        return encoders.key(torch.zeros(n, 8, dtype=dtype), W, k)

    assert key(100) == key(128) != key(129)
    assert key(1) == key(1) != key(2)
    assert key(100) != key(100, k=5) and key(100) != key(100, dtype=torch.float16)
    assert key(100).startswith("cpu | torch.float32 | torch ") and "n<=128 d=8 m=32 k=4" in key(100)


def test_the_override_skips_the_measurement(cache, monkeypatch):
    seconds, timed = fake_seconds({"fused": 1e-3, "chunked": 2e-3})
    monkeypatch.setenv(encoders.ENV_VAR, "chunked")
    assert encoders.choose(KEY, PATHS, seconds) == "chunked"
    assert timed == [] and not cache.exists()
    monkeypatch.setenv(encoders.ENV_VAR, "cublas")
    with pytest.raises(ValueError, match=r"SAE_FAST_ENCODER must be one of \['fused', 'chunked'\]"):
        encoders.choose(KEY, PATHS, seconds)


def test_a_ruled_out_path_loses_unmeasured_and_the_override_still_wins(cache, monkeypatch, caplog):
    seconds, timed = fake_seconds({"fused": 1e-3, "chunked": 2e-3})
    ruled_out = {"fused": "k=256 leaves 32-row tiles"}
    with caplog.at_level(logging.INFO, logger="sae_fast"):
        assert encoders.choose(KEY, PATHS, seconds, ruled_out=ruled_out) == "chunked"
    assert timed == [] and not cache.exists()  # no measurement, nothing kept on disk
    assert f"encoder for {KEY}: chunked (fused: k=256 leaves 32-row tiles)" in caplog.text
    encoders.forget()
    monkeypatch.setenv(encoders.ENV_VAR, "fused")
    assert encoders.choose(KEY, PATHS, seconds, ruled_out=ruled_out) == "fused"


@pytest.mark.parametrize(
    ("dtype", "d", "k", "why"),
    [
        (torch.bfloat16, 2304, 64, None),
        (torch.bfloat16, 2304, 128, None),
        (torch.bfloat16, 2304, 256, "32-row tiles, below wgmma's 64"),
        (torch.float16, 2300, 64, "not 16-byte aligned"),
        (torch.float32, 2300, 64, None),
        (torch.float32, 2304, 128, "float32 keys spills"),
    ],
)
def test_the_fused_kernels_cliffs(dtype, d, k, why):
    from sae_fast.kernels.encode_topk import cliff

    reason = cliff((9, 0), dtype, d, k)
    assert (reason is None) if why is None else why in reason
    assert cliff((8, 0), dtype, d, k) is None  # measured from sm_90 binaries only


@pytest.mark.parametrize(
    "damage", ["{not json", json.dumps({KEY: 3}), json.dumps({KEY: {"winner": "cublas"}})]
)
def test_a_damaged_cache_costs_a_measurement(cache, damage):
    cache.parent.mkdir()
    cache.write_text(damage)
    seconds, timed = fake_seconds({"fused": 1e-3, "chunked": 2e-3})
    assert encoders.choose(KEY, PATHS, seconds) == "fused"
    assert len(timed) == 2
    assert json.loads(cache.read_text())[KEY]["winner"] == "fused"


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(encoders.CACHE_ENV, str(blocker / "cache"))
    seconds, _ = fake_seconds({"fused": 2e-3, "chunked": 1e-3})
    with caplog.at_level(logging.WARNING, logger="sae_fast"):
        assert encoders.choose(KEY, PATHS, seconds) == "chunked"
    assert "encoder choice not kept in" in caplog.text


def test_the_cache_file_respects_the_umask(cache):
    import os

    old = os.umask(0o022)
    try:
        encoders.choose(KEY, PATHS, fake_seconds({"fused": 1e-3, "chunked": 2e-3})[0])
    finally:
        os.umask(old)
    assert cache.stat().st_mode & 0o777 == 0o644


@runs_here("triton")
def test_the_triton_backend_runs_the_chosen_encoder(monkeypatch):
    """SAE_FAST_ENCODER sends the triton backend's TopK code through the fused kernel or the
    chunked encoder (on a GPU without it, the first call would time both); both give the
    same code."""
    calls = []
    original = chunked.topk_code

    def counted(*args):
        calls.append(args[4])
        return original(*args)

    monkeypatch.setattr(chunked, "topk_code", counted)
    case = integer_case(11, 16, 64, seed=5).to(torch.float32, device=DEVICE)
    args = case.tensors()[:4]
    if DEVICE == "cpu":  # nothing to measure: the fused kernel, unless told otherwise
        ops.encode_topk(*args, 4, backend="triton")
        assert calls == []
    monkeypatch.setenv(encoders.ENV_VAR, "fused")
    fused = ops.encode_topk(*args, 4, backend="triton")
    assert calls == []
    monkeypatch.setenv(encoders.ENV_VAR, "chunked")
    through_chunked = ops.encode_topk(*args, 4, backend="triton")
    assert calls == [4]
    assert torch.equal(fused.indices, through_chunked.indices)
    assert torch.equal(fused.values, through_chunked.values)
