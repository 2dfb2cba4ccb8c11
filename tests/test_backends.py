"""Backend dispatch: auto choice from the inputs, the env override, errors that say why."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sae_fast import BackendUnavailableError, backend_status, backends, encode_topk
from sae_fast.ops import SparseCode
from sae_fast.options import BACKENDS


def _fake_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size):
    n = x.shape[0]
    return torch.full((n, k), 7.0), torch.zeros(n, k, dtype=torch.int64)


@pytest.fixture
def fake_backends():
    """A high-priority backend that cannot run here and one that can."""
    torch_backend = backends.get("torch")
    blocked = backends.Backend(
        name="blocked",
        priority=100,
        encoder_forward=_fake_forward,
        decode=torch_backend.decode,
        requirement=lambda device: "needs a GPU",
    )
    fake = backends.Backend(
        name="fake", priority=50, encoder_forward=_fake_forward, decode=torch_backend.decode
    )
    backends.register(blocked)
    backends.register(fake)
    yield
    backends.unregister("blocked")
    backends.unregister("fake")


def args():
    return torch.randn(2, 3), torch.randn(5, 3), torch.zeros(5), torch.zeros(3), 2


def test_torch_backend_always_available():
    assert backend_status("cpu")["torch"] is None
    assert backend_status("cpu", torch.float64)["torch"] is None
    assert "torch" in backends.registered()


def test_auto_skips_backends_that_cannot_run(fake_backends, caplog):
    assert backends.registered()[:2] == ["blocked", "fake"]
    with caplog.at_level(logging.INFO, logger="sae_fast"):
        code = encode_topk(*args())
    assert isinstance(code, SparseCode)
    assert code.values.eq(7.0).all()  # the fake backend ran
    assert "backend 'fake' runs on cpu float32 tensors (auto)" in caplog.text


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


def _gpu_backends_here() -> list[str]:
    """The GPU backends that would run on CUDA float32 tensors on this install, best first."""
    cuda = torch.device("cuda")
    return [n for n in ("cuda", "triton") if backends.get(n).requirement(cuda) is None]


def test_selection_looks_at_dtype_not_only_device():
    """float64 CUDA tensors go to the torch backend, which computes them; float32 and bf16 to
    the best GPU backend built here. Fake tensors carry CUDA device metadata without a GPU."""
    gpu = _gpu_backends_here()
    with FakeTensorMode():
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = torch.empty(4, 8, device="cuda", dtype=dtype)
            W = torch.empty(16, 8, device="cuda", dtype=dtype)
            chosen = backends.resolve(None, x, W).name
            assert chosen == ("torch" if dtype == torch.float64 or not gpu else gpu[0]), dtype
    assert backends.automatic("cuda", torch.float64) == ["torch"]
    assert backends.automatic("cuda", torch.float32) == [*gpu, "torch"]


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_asking_a_gpu_backend_for_float64_says_why(name):
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda", dtype=torch.float64)
        reason = backends.get(name).requirement(x.device) or (
            f"the {name} backend computes float32, float16, bfloat16, not float64"
        )
        with pytest.raises(BackendUnavailableError) as e:
            backends.resolve(name, x)
    assert str(e.value) == f"backend {name!r} (requested) cannot run on cuda:0: {reason}"


def test_device_types_are_declared():
    status = backend_status("meta")
    assert status["torch"] is None  # any device
    if backends.get("cuda").requirement(torch.device("meta")) is None:
        assert status["cuda"] == "the cuda backend runs on cuda tensors, not meta"


def test_the_option_names_list_the_registered_backends():
    real = [name for name in backends.registered() if name in BACKENDS]
    assert real == list(BACKENDS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_refused_not_silently_first_order(backend):
    """create_graph=True through the sparse ops used to give a gradient whose own gradient
    came back as None: the second-order term dropped without a word."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    W = torch.randn(16, 8, requires_grad=True)
    b_enc, b_dec = torch.zeros(16), torch.zeros(8)
    code = encode_topk(x, W, b_enc, b_dec, k=3, backend=backend)
    with pytest.raises(RuntimeError, match="no second derivative: backward with create_graph"):
        torch.autograd.grad(code.values.pow(2).sum(), x, create_graph=True)
    code = encode_topk(x, W, b_enc, b_dec, k=3, backend=backend)
    (grad,) = torch.autograd.grad(code.values.pow(2).sum(), x)  # first order still works
    assert grad.shape == x.shape and not grad.requires_grad
