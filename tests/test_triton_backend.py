"""The triton backend against the reference, on CPU under TRITON_INTERPRET=1 (tiny shapes).

The interpreter proves indexing, masking and math; races, TF32 tolerances and speed need a
GPU (tests/test_gpu_triton.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import (
    assert_within_torch_error,
    auxk_grads,
    encode_decode_grads,
    integer_case,
    reference_auxk,
    separated_case,
)

from sae_fast import backend_status, backends, ops
from sae_fast import reference as ref

pytestmark = pytest.mark.skipif(
    backend_status("cpu")["triton"] is not None and not torch.cuda.is_available(),
    reason=f"triton backend cannot run here: {backend_status('cpu')['triton']}",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_encode(x, W_enc, b_enc, b_dec, k):
    return tuple(ops.encode_topk(x, W_enc, b_enc, b_dec, k, backend="triton"))


def triton_decode(values, indices, W_dec, b_dec):
    return ops.decode(values, indices, W_dec, b_dec, backend="triton")


SHAPES = list(itertools.product([1, 5, 33], [16, 40], [64, 200], [1, 4, 8]))
# k=3 is padded to 4 inside the kernel.
CASES = [(*s, dt) for s in SHAPES for dt in (torch.float32, torch.float16)] + [
    (5, 16, 200, 3, torch.float32)
]


@pytest.mark.parametrize(("n", "d", "m", "k", "dtype"), CASES)
def test_matches_reference(n, d, m, k, dtype):
    case = separated_case(n, d, m, k, seed=n + d + m, tol=3e-2 if dtype == torch.float16 else 1e-3)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    plain = encode_decode_grads(ref.encode_topk, ref.decode, case.to(dtype, True, DEVICE), k)
    ours = encode_decode_grads(triton_encode, triton_decode, case.to(dtype, True, DEVICE), k)
    assert ours["values"].dtype == dtype and ours["indices"].dtype == torch.int64
    assert torch.equal(ours["indices"].cpu(), oracle["indices"])
    for name in oracle:
        if name != "indices":
            assert_within_torch_error(ours[name].cpu(), plain[name].cpu(), oracle[name], name)


@pytest.mark.parametrize("k", [3, 8])
def test_ties_and_rows_with_few_positives_exact(k):
    """Integer data: ties, all-negative rows, rows with < k positives; exact in float32."""
    case = integer_case(13, 16, 64, seed=k)
    oracle = encode_decode_grads(
        ref.encode_topk, ref.decode, case.to(torch.float64, True), k, integer=True
    )
    ours = encode_decode_grads(
        triton_encode, triton_decode, case.to(torch.float32, True, DEVICE), k, integer=True
    )
    for name, want in oracle.items():
        assert torch.equal(ours[name].cpu().to(want.dtype), want), name
    assert torch.equal(ours["indices"][0].cpu(), torch.arange(k))  # all-negative row


def test_empty_and_non_contiguous_input():
    case = separated_case(6, 16, 64, 4, seed=3).to(torch.float32, device=DEVICE)
    empty = ops.encode_topk(case.x[:0], case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    assert empty.values.shape == (0, 4) and empty.indices.shape == (0, 4)
    assert triton_decode(*empty, case.W_dec, case.b_dec).shape == (0, 16)
    strided = torch.zeros(6, 32, device=DEVICE)
    strided[:, ::2] = case.x
    got = ops.encode_topk(strided[:, ::2], case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    want = ops.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_triton_is_never_picked_automatically_for_cpu_tensors():
    assert backends.resolve(None, torch.randn(2, 3)).name == "torch"


def test_reason_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend_status("cpu")["triton"]
    assert (
        reason == "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    )
    with pytest.raises(backends.BackendUnavailableError, match="'triton' .*cannot run on cpu"):
        ops.encode_topk(torch.randn(2, 4), torch.randn(8, 4), torch.zeros(8), torch.zeros(4), 2,
                        backend="triton")  # fmt: skip


@pytest.mark.parametrize(("k", "k_aux"), [(3, 5), (8, 1)])
def test_auxk_code_from_the_same_pass_exact(k, k_aux):
    case = integer_case(13, 16, 64, seed=k + k_aux)
    dead = torch.arange(64) % 3 == 0
    oracle = auxk_grads(reference_auxk, case.to(torch.float64, True), k, dead, k_aux)

    def ours(*args):
        return ops.encode_topk_auxk(*args, backend="triton")

    got = auxk_grads(ours, case.to(torch.float32, True, DEVICE), k, dead, k_aux)
    for name, want in oracle.items():
        assert torch.equal(got[name].cpu().to(want.dtype), want), name
