"""The latent-sharded ops on real torch.distributed groups (gloo, 2 and 3 processes) against
the unsharded ops: exact on integer data full of ties across shard boundaries, all-negative
rows and rows with fewer than k positives; every gradient in float64."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_fast import decode, encode_topk, encode_topk_auxk
from sae_fast.parallel.ops import (
    shard_range,
    sharded_decode,
    sharded_encode_topk,
    sharded_encode_topk_auxk,
)

N, D, M, K, K_AUX = 9, 6, 11, 4, 3


def integer_case(dtype=torch.float32):
    """Small integers: pre-activations tie often, across shard boundaries too; row 0 is all
    negative, and several rows have fewer than K positives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (N, D), generator=g).to(dtype)
    W_enc = torch.randint(-1, 2, (M, D), generator=g).to(dtype)
    b_enc = torch.randint(-3, 1, (M,), generator=g).to(dtype)
    for low in (3, 5, 7):  # pairs tying on every row across each boundary (2 ranks: 6 | 3: 4, 8)
        W_enc[low + 1], b_enc[low + 1] = W_enc[low], b_enc[low]
    x[0] = 0  # pre = b_enc <= 0 everywhere: all padding
    W_dec = torch.randint(-2, 3, (M, D), generator=g).to(dtype)
    b_dec = torch.zeros(D, dtype=dtype)
    dead = torch.arange(M) % 3 == 0
    return x, W_enc, b_enc, W_dec, b_dec, dead


def _worker(rank: int, world: int, init: str, check: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        globals()[check](rank, world)
    finally:
        dist.destroy_process_group()


def _exact(rank: int, world: int, block: int | None = None) -> None:
    x, W_enc, b_enc, W_dec, b_dec, dead = integer_case()
    off, m = shard_range(M, rank if block is None else block, world)
    mine = slice(off, off + m)
    full = encode_topk(x, W_enc, b_enc, b_dec, K)
    code = sharded_encode_topk(x, W_enc[mine], b_enc[mine], b_dec, K, offset=off)
    assert torch.equal(code.indices, full.indices) and torch.equal(code.values, full.values)
    x_hat = sharded_decode(code.values, code.indices, W_dec[mine], b_dec, offset=off)
    assert torch.equal(x_hat, decode(full.values, full.indices, W_dec, b_dec))
    full_code, full_aux = encode_topk_auxk(x, W_enc, b_enc, b_dec, K, dead, K_AUX)
    code, aux = sharded_encode_topk_auxk(
        x, W_enc[mine], b_enc[mine], b_dec, K, dead[mine], K_AUX, offset=off
    )
    assert torch.equal(code.indices, full_code.indices)
    assert torch.equal(aux.indices, full_aux.indices) and torch.equal(aux.values, full_aux.values)


def _exact_reversed(rank: int, world: int) -> None:
    """The blocks in the opposite order of the ranks: rank 0 holds the highest latents."""
    _exact(rank, world, block=world - 1 - rank)


def _loss(x, x_hat, aux_hat):
    return (x_hat - x).pow(2).sum() + 0.5 * (aux_hat - x).pow(2).sum()


def _gradients(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
              [(N, D), (M, D), (M,), (M, D), (D,)]]  # fmt: skip
    dead = torch.arange(M) % 2 == 1
    full = [p.clone().requires_grad_() for p in params]
    x, W_enc, b_enc, W_dec, b_dec = full
    code, aux = encode_topk_auxk(x, W_enc, b_enc, b_dec, K, dead, K_AUX)
    want = _loss(x, decode(*code, W_dec, b_dec), decode(*aux, W_dec, torch.zeros_like(b_dec)))
    want.backward()

    off, m = shard_range(M, rank, world)
    mine = slice(off, off + m)
    x, b_dec = (params[i].clone().requires_grad_() for i in (0, 4))
    W_enc, b_enc, W_dec = (params[i][mine].clone().requires_grad_() for i in (1, 2, 3))
    code, aux = sharded_encode_topk_auxk(x, W_enc, b_enc, b_dec, K, dead[mine], K_AUX, offset=off)
    x_hat = sharded_decode(*code, W_dec, b_dec, offset=off)
    aux_hat = sharded_decode(*aux, W_dec, torch.zeros_like(b_dec), offset=off)
    got = _loss(x, x_hat, aux_hat)
    got.backward()
    torch.testing.assert_close(got, want)
    for name, ours, theirs in [("x", x, full[0]), ("b_dec", b_dec, full[4])]:
        torch.testing.assert_close(ours.grad, theirs.grad, msg=name)
    for name, ours, i in [("W_enc", W_enc, 1), ("b_enc", b_enc, 2), ("W_dec", W_dec, 3)]:
        torch.testing.assert_close(ours.grad, full[i].grad[mine], msg=name)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("check", ["_exact", "_exact_reversed", "_gradients"])
def test_sharded_ops_equal_the_unsharded_ones(tmp_path, world, check):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, check), nprocs=world, join=True)


def test_shard_ranges_cover_the_dictionary_in_order():
    blocks = [shard_range(11, r, 3) for r in range(3)]
    assert blocks == [(0, 4), (4, 4), (8, 3)]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\)"):
        shard_range(11, 3, 3)


def test_the_sharded_ops_need_a_process_group():
    x, W_enc, b_enc, _, b_dec, _ = integer_case()
    with pytest.raises(RuntimeError, match="need torch.distributed"):
        sharded_encode_topk(x, W_enc, b_enc, b_dec, K, offset=0)
    assert os.environ.get("RANK") is None
