"""A cross-layer transcoder sharded by features on real torch.distributed groups (gloo, 2 and
3 processes) against one process: outputs, the training loss with AuxK, every gradient, and
the weights after three Adam steps, on integer data full of ties and all-negative rows
(float64; outputs bit for bit, the rest to 1e-9)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_clt import D_IN, D_OUT, K, L, M, integer_clt

from sae_fast.clt import CrossLayerTranscoder
from sae_fast.parallel.clt import ShardedCrossLayerTranscoder
from sae_fast.parallel.ops import shard_range
from sae_fast.training.clt_losses import CLTLossWeights, clt_training_loss

ROWS = ("W_enc", "b_enc")  # (L, m, ...): a shard holds [:, offset:offset + size]


def shard_of(full, rank: int, world: int) -> ShardedCrossLayerTranscoder:
    """Rank's block of features of full, its tensors sliced from full's."""
    offset, size = shard_range(M, rank, world)
    shard = ShardedCrossLayerTranscoder(
        full.n_layers, full.d_in, M, offset=offset, size=size, k=full.k,
        activation=full.activation, d_out=full.d_out, skip_connection=full.skip_connection,
        dtype=torch.float64,
    )  # fmt: skip
    tensors = {}
    for name, t in full.state_dict().items():
        if name in ROWS:
            t = t[:, offset : offset + size]
        elif name.startswith("W_dec."):
            t = t[offset : offset + size]
        tensors[name] = t.clone()
    shard.load_state_dict(tensors)
    return shard.train()


def _loss_and_grads(clt, x, y, dead):
    x = x.clone().requires_grad_(True)
    clt.zero_grad()
    res = clt_training_loss(clt, x, y, CLTLossWeights(auxk=0.5, k_aux=5), dead)
    res.loss.backward()
    grads = {name: p.grad.clone() for name, p in clt.named_parameters()}
    return res, x.grad, grads


def _check(rank: int, world: int, activation: str) -> None:
    full, x = integer_clt(activation, skip=True)
    g = torch.Generator().manual_seed(9)
    y = torch.randint(-2, 3, (L, x.shape[1], full.d_out), generator=g).double()
    dead = torch.rand(L, M, generator=torch.Generator().manual_seed(2)) < 0.4
    shard = shard_of(full, rank, world)
    offset, size = shard.latent_offset, shard.W_enc.shape[1]
    with torch.no_grad():
        assert torch.equal(shard(x).y_hat, full(x).y_hat)
    want, want_x, want_grads = _loss_and_grads(full, x, y, dead)
    got, got_x, got_grads = _loss_and_grads(shard, x, y, dead[:, offset : offset + size])
    assert set(got.terms) == {"recon", "auxk"}
    for name, value in want.terms.items():
        torch.testing.assert_close(got.terms[name], value, rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-10)
    for name, grad in want_grads.items():
        if name in ROWS:
            grad = grad[:, offset : offset + size]
        elif name.startswith("W_dec."):
            grad = grad[offset : offset + size]
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=1e-10, msg=name)
    # Three Adam steps each, on continuous data (the steps' rounding must not meet integer
    # ties): the shard's weights stay the full CLT's block.
    torch.manual_seed(3)
    full = CrossLayerTranscoder(
        L, D_IN, M, k=K, activation=activation, d_out=D_OUT, skip_connection=True,
        dtype=torch.float64,
    )  # fmt: skip
    x, y = torch.randn(L, 40, D_IN, dtype=torch.float64), torch.randn(L, 40, D_OUT).double()
    shard = shard_of(full, rank, world)
    for clt, mask in ((full, dead), (shard, dead[:, offset : offset + size])):
        optimizer = torch.optim.Adam(clt.parameters(), lr=0.05)
        for _ in range(3):
            optimizer.zero_grad()
            clt_training_loss(clt, x, y, CLTLossWeights(auxk=0.5, k_aux=5), mask).loss.backward()
            optimizer.step()
    for name, t in full.state_dict().items():
        if name in ROWS:
            t = t[:, offset : offset + size]
        elif name.startswith("W_dec."):
            t = t[offset : offset + size]
        torch.testing.assert_close(shard.state_dict()[name], t, rtol=0, atol=1e-9, msg=name)


def _worker(rank: int, world: int, init: str, activation: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _check(rank, world, activation)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_sharded_clt_equals_one_process(tmp_path, world, activation):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, activation), nprocs=world, join=True)


def test_a_sharded_clt_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match="needs activation in"):
        ShardedCrossLayerTranscoder(L, 4, M, offset=0, size=10, k=None, activation="relu")
    with pytest.raises(ValueError, match=r"features \[30, 40\) are not in \[0, 37\)"):
        ShardedCrossLayerTranscoder(L, 4, M, offset=30, size=10, k=4)
