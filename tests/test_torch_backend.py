"""The torch backend against the dense reference: forward and every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import (
    assert_auxk_exact,
    assert_within_torch_error,
    encode_decode_grads,
    integer_case,
    separated_case,
)
from torch.utils._python_dispatch import TorchDispatchMode

from sae_fast import ops
from sae_fast import reference as ref


def ops_encode(chunk_size=None):
    def encode(x, W_enc, b_enc, b_dec, k):
        code = ops.encode_topk(x, W_enc, b_enc, b_dec, k, backend="torch", chunk_size=chunk_size)
        return code.values, code.indices

    return encode


def ops_decode(values, indices, W_dec, b_dec):
    return ops.decode(values, indices, W_dec, b_dec, backend="torch")


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
@pytest.mark.parametrize(("n", "d", "m", "k"), [(5, 4, 11, 3), (3, 6, 9, 1), (4, 3, 8, 8)])
def test_gradcheck_float64(n, d, m, k, chunk_size):
    case = separated_case(n, d, m, k, seed=n + m).to(torch.float64, requires_grad=True)
    encode = ops_encode(chunk_size)

    def full(x, W_enc, b_enc, b_dec, W_dec):
        values, indices = encode(x, W_enc, b_enc, b_dec, k)
        return values, ops_decode(values, indices, W_dec, b_dec)

    assert torch.autograd.gradcheck(full, case.tensors())


SHAPES = list(itertools.product([1, 7, 129], [5, 96, 100], [17, 300, 1000], [1, 3, 16]))


@pytest.mark.parametrize("chunk_size", [None, 37])
@pytest.mark.parametrize(("n", "d", "m", "k"), SHAPES)
def test_float32_matches_reference(n, d, m, k, chunk_size):
    case = separated_case(n, d, m, k, seed=n * d + m + k)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    plain = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float32, True), k)
    ours = encode_decode_grads(ops_encode(chunk_size), ops_decode, case.to(torch.float32, True), k)
    assert ours["indices"].dtype == torch.int64
    assert torch.equal(ours["indices"], oracle["indices"])
    assert ours["values"].dtype == torch.float32
    for name in oracle:
        if name != "indices":
            assert_within_torch_error(ours[name], plain[name], oracle[name], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize(("d", "m"), [(5, 17), (40, 300)])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_ties_and_few_positives_exact(d, m, k, chunk_size, dtype):
    """Integer data: ties everywhere, all-negative rows, rows with < k positives; exact."""
    case = integer_case(13, d, m, seed=d + m + k)
    oracle = encode_decode_grads(
        ref.encode_topk, ref.decode, case.to(torch.float64, True), k, integer=True
    )
    ours = encode_decode_grads(
        ops_encode(chunk_size), ops_decode, case.to(dtype, True), k, integer=True
    )
    for name, want in oracle.items():
        assert torch.equal(ours[name].to(want.dtype), want), name
    # Row 0 is all-negative: zero values at the lowest indices, in order.
    assert torch.equal(ours["values"][0], torch.zeros(k, dtype=dtype))
    assert torch.equal(ours["indices"][0], torch.arange(k))


def test_canonical_order_on_exact_ties():
    """Equal pre-activations across chunk boundaries: values descending, lower index first."""
    W_enc = torch.tensor([[1.0], [2.0], [2.0], [1.0], [2.0], [0.5], [2.0]])
    x = torch.ones(2, 1)
    x[1] = -1.0  # all pre-activations negative in row 1
    zeros = torch.zeros(7), torch.zeros(1)
    for chunk_size in (None, 1, 2, 3):
        values, indices = ops.encode_topk(x, W_enc, *zeros, k=5, chunk_size=chunk_size)
        assert indices.tolist() == [[1, 2, 4, 6, 0], [0, 1, 2, 3, 4]], chunk_size
        assert values.tolist() == [[2.0, 2.0, 2.0, 2.0, 1.0], [0.0] * 5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    n, d, m, k = 33, 40, 200, 4
    case = separated_case(n, d, m, k, seed=3, tol=3e-2)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    plain = encode_decode_grads(ref.encode_topk, ref.decode, case.to(dtype, True), k)
    ours = encode_decode_grads(ops_encode(64), ops_decode, case.to(dtype, True), k)
    assert ours["values"].dtype == dtype and ours["x_hat"].dtype == dtype
    assert torch.equal(ours["indices"], oracle["indices"])
    for name in oracle:
        if name != "indices":
            assert_within_torch_error(ours[name], plain[name], oracle[name], name)


def test_empty_batch():
    case = separated_case(4, 6, 20, 3).to(torch.float32, True)
    x = case.x[:0].detach().requires_grad_(True)
    values, indices = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)
    x_hat = ops.decode(values, indices, case.W_dec, case.b_dec)
    assert x_hat.shape == (0, 6)
    x_hat.sum().backward()
    assert x.grad.shape == (0, 6)
    assert torch.equal(case.W_enc.grad, torch.zeros_like(case.W_enc))
    assert torch.equal(case.W_dec.grad, torch.zeros_like(case.W_dec))


def test_non_contiguous_x():
    case = separated_case(9, 8, 50, 3, seed=5).to(torch.float32)
    wide = torch.zeros(9, 16)
    wide[:, ::2] = case.x
    strided = wide[:, ::2]
    transposed = case.x.T.contiguous().T
    assert not strided.is_contiguous() and not transposed.is_contiguous()
    want = ops.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, 3)
    for x in (strided, transposed):
        got = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 3)
        # A strided operand may take another GEMM path: same latents, values to rounding.
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.values, want.values)


def test_int32_indices_decode_like_int64():
    case = separated_case(6, 8, 30, 3, seed=2).to(torch.float32)
    code = ops.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, 3)
    want = ops.decode(code.values, code.indices, case.W_dec, case.b_dec)
    got = ops.decode(code.values, code.indices.int(), case.W_dec, case.b_dec)
    assert torch.equal(got, want)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op's output holds."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_dense_latent_matrix_forward_or_backward():
    """With chunks of 64 latents, no op in forward or backward makes an (n, m) tensor."""
    n, d, m, k = 64, 16, 2048, 8
    case = separated_case(n, d, m, k, seed=1).to(torch.float32, True)
    with _LargestTensor() as probe:
        code = ops.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, k, chunk_size=64)
        x_hat = ops.decode(code.values, code.indices, case.W_dec, case.b_dec)
        ((x_hat - case.x) ** 2).sum().backward()
    # Parameters and their gradients are (m, d); pre-activations never exceed (n, chunk).
    assert probe.largest == m * d
    assert n * m > m * d
    with _LargestTensor() as dense:
        ref.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, k)
    assert dense.largest == n * m  # the probe does see a dense encoder's matrix


def test_nan_activations_stay_visible():
    """A NaN input row must not come out as a clean zero code."""
    case = separated_case(4, 8, 40, 3, seed=6).to(torch.float32)
    x = case.x.clone()
    x[2, 0] = float("nan")
    values, _ = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 3, chunk_size=16)
    assert values[2].isnan().any()
    assert not values[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("chunk_size", [None, 6])
@pytest.mark.parametrize(("k", "k_aux"), [(3, 5), (8, 1), (1, 16)])
def test_auxk_code_from_the_same_pass_exact(k, k_aux, chunk_size):
    """AuxK on integer data (ties, few positives): codes and gradients exactly the oracle's."""
    case = integer_case(13, 16, 40, seed=k + k_aux)
    dead = torch.arange(40) % 3 == 0
    got = assert_auxk_exact(case, k, dead, k_aux, backend="torch", chunk_size=chunk_size)
    live_picked = ~dead[got["aux_indices"]] & (got["aux_values"] != 0)
    assert not live_picked.any()  # only dead latents carry AuxK values
