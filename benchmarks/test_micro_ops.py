"""pytest-benchmark micro-benchmarks of the ops, per backend (not in the CI test command).

    python -m pytest benchmarks/test_micro_ops.py --benchmark-autosave
    python -m pytest benchmarks/test_micro_ops.py --benchmark-compare   # against the last save

Shape: SAE_FAST_MICRO_SHAPE="n,d,m,k" (default 1024,512,8192,32), fp32, on CUDA when present.
"""

from __future__ import annotations

import os

import pytest
import torch

import sae_fast

from .impls import Weights, activations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, D, M, K = (int(v) for v in os.environ.get("SAE_FAST_MICRO_SHAPE", "1024,512,8192,32").split(","))
BACKENDS = sae_fast.backends.automatic(DEVICE)


def _sync(result):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return result


@pytest.fixture(scope="module")
def inputs():
    w = Weights.random(D, M, torch.float32, DEVICE)
    return w, activations(N, D, torch.float32, DEVICE)


def test_dense_gemm_floor(benchmark, inputs):
    w, x = inputs
    benchmark(lambda: _sync(x @ w.W_enc.T))


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode(benchmark, inputs, backend):
    w, x = inputs
    with torch.no_grad():
        code = benchmark(
            lambda: _sync(sae_fast.encode_topk(x, w.W_enc, w.b_enc, w.b_dec, K, backend=backend))
        )
    assert code.values.shape == (N, K)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode(benchmark, inputs, backend):
    w, x = inputs
    with torch.no_grad():
        code = sae_fast.encode_topk(x, w.W_enc, w.b_enc, w.b_dec, K, backend=backend)
        x_hat = benchmark(lambda: _sync(sae_fast.decode(*code, w.W_dec, w.b_dec, backend=backend)))
    assert x_hat.shape == (N, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(benchmark, inputs, backend):
    w, x = inputs
    params = [t.detach().clone().requires_grad_(True) for t in (w.W_enc, w.b_enc, w.W_dec, w.b_dec)]
    W_enc, b_enc, W_dec, b_dec = params

    def step():
        code = sae_fast.encode_topk(x, W_enc, b_enc, b_dec, K, backend=backend)
        (sae_fast.decode(*code, W_dec, b_dec, backend=backend) - x).pow(2).sum().backward()
        for p in params:
            p.grad = None
        return _sync(None)

    benchmark(step)
