"""The torch backend on CUDA tensors against the float64 reference (run where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch
from cases import assert_within_torch_error, encode_decode_grads, integer_case, separated_case

from sae_fast import ops
from sae_fast import reference as ref

pytestmark = pytest.mark.gpu


def ops_encode(x, W_enc, b_enc, b_dec, k):
    return tuple(ops.encode_topk(x, W_enc, b_enc, b_dec, k, backend="torch", chunk_size=96))


def ops_decode(values, indices, W_dec, b_dec):
    return ops.decode(values, indices, W_dec, b_dec, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "d", "m", "k"), [(1, 96, 300, 3), (129, 100, 1000, 16), (7, 5, 17, 1)]
)
def test_cuda_matches_reference(n, d, m, k, dtype):
    case = separated_case(n, d, m, k, seed=m + k, tol=3e-2 if dtype == torch.bfloat16 else 1e-3)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    plain = encode_decode_grads(ref.encode_topk, ref.decode, case.to(dtype, True, device="cuda"), k)
    ours = encode_decode_grads(ops_encode, ops_decode, case.to(dtype, True, device="cuda"), k)
    assert torch.equal(ours["indices"].cpu(), oracle["indices"])
    for name in oracle:
        if name != "indices":
            assert_within_torch_error(ours[name].cpu(), plain[name].cpu(), oracle[name], name)


def test_cuda_ties_exact(monkeypatch):
    case = integer_case(13, 40, 300, seed=1)
    oracle = encode_decode_grads(
        ref.encode_topk, ref.decode, case.to(torch.float64, True), 16, integer=True
    )
    # TF32 would round the integer products; full float32 keeps them exact.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours = encode_decode_grads(
        ops_encode, ops_decode, case.to(torch.float32, True, device="cuda"), 16, integer=True
    )
    for name, want in oracle.items():
        assert torch.equal(ours[name].cpu().to(want.dtype), want), name
