"""Backend dispatch: auto choice, the env override, errors that say why."""

from __future__ import annotations

import logging

import pytest
import torch

from sae_fast import BackendUnavailableError, backend_status, backends, encode_topk
from sae_fast.ops import SparseCode


def _fake_encode(x, W_enc, b_enc, b_dec, k, chunk_size):
    n = x.shape[0]
    return torch.full((n, k), 7.0), torch.zeros(n, k, dtype=torch.int64)


@pytest.fixture
def fake_backends():
    """A high-priority backend that cannot run here and one that can."""
    torch_backend = backends._REGISTRY["torch"]
    blocked = backends.Backend("blocked", 100, lambda device: "needs a GPU", None, None, None)
    fake = backends.Backend(
        "fake", 50, lambda device: None, _fake_encode, None, torch_backend.decode
    )
    backends.register(blocked)
    backends.register(fake)
    yield
    del backends._REGISTRY["blocked"], backends._REGISTRY["fake"]


def args():
    return torch.randn(2, 3), torch.randn(5, 3), torch.zeros(5), torch.zeros(3), 2


def test_torch_backend_always_available():
    assert backend_status("cpu")["torch"] is None
    assert "torch" in backends.registered()


def test_auto_skips_backends_that_cannot_run(fake_backends, caplog):
    assert backends.registered()[:2] == ["blocked", "fake"]
    with caplog.at_level(logging.INFO, logger="sae_fast"):
        code = encode_topk(*args())
    assert isinstance(code, SparseCode)
    assert code.values.eq(7.0).all()  # the fake backend ran
    assert "backend 'fake' runs on cpu tensors (auto)" in caplog.text


def test_explicit_request_that_cannot_run_says_why(fake_backends):
    with pytest.raises(BackendUnavailableError, match="'blocked' .*cannot run on cpu: needs a GPU"):
        encode_topk(*args(), backend="blocked")
    assert backend_status("cpu")["blocked"] == "needs a GPU"


def test_env_var_overrides_auto(fake_backends, monkeypatch):
    monkeypatch.setenv("SAE_FAST_BACKEND", "torch")
    assert not encode_topk(*args()).values.eq(7.0).all()
    monkeypatch.setenv("SAE_FAST_BACKEND", "blocked")
    with pytest.raises(BackendUnavailableError, match="env SAE_FAST_BACKEND"):
        encode_topk(*args())
    # An explicit argument wins over the env var.
    assert encode_topk(*args(), backend="fake").values.eq(7.0).all()


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of .*'torch'.*got 'cudnn'"):
        encode_topk(*args(), backend="cudnn")
    monkeypatch.setenv("SAE_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"got 'nope' \(env SAE_FAST_BACKEND\)"):
        encode_topk(*args())
