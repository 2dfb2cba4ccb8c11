"""The sae_fast checkpoint folder: bit-exact round trip, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_fast import ACTIVATIONS, CheckpointError, SparseAutoencoder
from sae_fast.files import atomic_path


def trained_like(activation: str, dtype=torch.float32) -> SparseAutoencoder:
    torch.manual_seed(0)
    k = 3 if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(5, 12, k=k, activation=activation, dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p))
        if activation == "batchtopk":
            sae.threshold.fill_(0.125)
    return sae


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_round_trip_is_bit_exact(tmp_path, activation, dtype):
    sae = trained_like(activation, dtype)
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.config() == sae.config()
    want, got = sae.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(
            got[name].reshape(-1).view(torch.uint8), want[name].reshape(-1).view(torch.uint8)
        ), name
    x = torch.randn(4, 5, dtype=dtype)
    sae.eval(), loaded.eval()
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_load_overrides_dtype_and_device(tmp_path):
    trained_like("topk").save(tmp_path)
    sae = SparseAutoencoder.load(tmp_path, device="cpu", dtype=torch.float64, backend="torch")
    assert sae.W_enc.dtype == torch.float64 and sae.W_enc.device.type == "cpu"
    assert sae.backend == "torch"


def test_cfg_json_is_readable_and_versioned(tmp_path):
    trained_like("jumprelu").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["format"] == "sae_fast" and cfg["format_version"] == 1
    assert cfg["activation"] == "jumprelu" and cfg["d_in"] == 5 and cfg["n_latents"] == 12


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    trained_like("topk").save(tmp_path)
    second = trained_like("relu")
    second.save(tmp_path)
    assert SparseAutoencoder.load(tmp_path).activation == "relu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


@pytest.fixture
def saved(tmp_path):
    trained_like("topk").save(tmp_path)
    return tmp_path


def edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_missing_folder_or_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        SparseAutoencoder.load(tmp_path / "nope")
    (saved / "cfg.json").unlink()
    with pytest.raises(CheckpointError, match="has no cfg.json"):
        SparseAutoencoder.load(saved)


def test_missing_weights(saved):
    (saved / "sae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no sae.safetensors"):
        SparseAutoencoder.load(saved)


def test_truncated_weights(saved):
    path = saved / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="sae.safetensors is truncated or corrupt"):
        SparseAutoencoder.load(saved)


def test_corrupt_config(saved):
    (saved / "cfg.json").write_text('{"format": "sae_fast", ')
    with pytest.raises(CheckpointError, match="cfg.json is not valid JSON"):
        SparseAutoencoder.load(saved)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "saelens"}, "not a sae_fast file"),
        ({"format_version": 99}, "format_version 99; this sae_fast reads up to 1"),
        ({"activation": "softmax"}, "does not describe an SAE.*activation"),
        ({"dtype": "not_a_dtype"}, "does not describe an SAE"),
        ({"k": 50}, "does not describe an SAE.*k must satisfy"),
        ({"n_latents": 13}, r"W_dec is \(12, 5\).*implies \(13, 5\)"),
        ({"dtype": "float64"}, "W_dec is .* torch.float32 but cfg.json implies .* torch.float64"),
    ],
)
def test_config_errors(saved, changes, message):
    edit_cfg(saved, **changes)
    with pytest.raises(CheckpointError, match=message):
        SparseAutoencoder.load(saved, format="sae_fast")


def test_detection_says_what_it_found(saved):
    edit_cfg(saved, format="somebody_else")
    with pytest.raises(CheckpointError, match=r"not a checkpoint sae_fast reads .*'cfg.json'"):
        SparseAutoencoder.load(saved)
    with pytest.raises(CheckpointError, match="format must be one of"):
        SparseAutoencoder.load(saved, format="pickle")


def test_missing_and_unexpected_tensors(saved):
    path = saved / "sae.safetensors"
    tensors = load_file(path)
    tensors["extra"] = tensors.pop("b_dec")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"missing tensors \['b_dec'\].*\['extra'\]"):
        SparseAutoencoder.load(saved)
