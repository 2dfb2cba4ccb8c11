"""The sparse ops over a dictionary sharded by latents across a torch.distributed group, exact.

Each rank of `group` holds a contiguous block of latents, global indices [offset, offset + m_r):
its rows of W_enc, b_enc and W_dec; b_dec and x are the same on every rank.

encode: each rank takes its local top-min(k, m_r) in canonical order (values descending,
ties to the lower index, zero padding at the lowest unused indices), shifted to global
indices; one all_gather of (n, k) values and indices; every rank then picks the same global
top-k by (value descending, index ascending). That is the unsharded code exactly: no global
top-k entry can lie outside its shard's local top-k, and each shard's zero padding sits at its
lowest unused indices, so the merged padding is the global lowest unused ones. Nothing is
approximated and no second round is needed.

decode: each rank sums its own entries of the global code (the others' weigh 0); one
all_reduce gives x_hat, then b_dec.

backward, where each gradient's parameter lives: the loss is computed alike on every rank of
the group, so grad x_hat is too. The decoder's all_reduce passes it through unchanged; each
rank's entries of the code carry their gradient back into its own encoder (the others' are
detached copies); W_enc, b_enc, W_dec grads stay local; the encoder's shares of grad x and
grad b_dec are summed by one all_reduce each (b_dec's decoder term is already whole).
Collectives per step: forward 2 all_gathers of (n, k) + 1 all_reduce of (n, d); backward
1 all_reduce of (n, d) for x (when x needs a gradient) and 1 of (d,) for b_dec.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import SparseCode, decode, encode_topk, encode_topk_auxk
from ..options import SPARSE_ACTIVATIONS, is_int

_PAD_INDEX = torch.iinfo(torch.int64).max  # candidates a small shard lacks: sort last


def shard_range(n_latents: int, rank: int, world: int) -> tuple[int, int]:
    """(offset, size) of rank's block when n_latents are split into world contiguous blocks,
    the first n_latents % world one latent larger."""
    for name, value in (("n_latents", n_latents), ("world", world)):
        if not is_int(value, 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not is_int(rank, 0) or rank >= world:
        raise ValueError(f"rank must be in [0, {world}), got {rank!r}")
    base, extra = divmod(n_latents, world)
    return rank * base + min(rank, extra), base + (rank < extra)


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (each rank holds a share)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(sum) forward; backward passes the (replicated) gradient through."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class InGroup:
    """A module sharded over the process group self.group: a deep copy (an exported or
    checkpointed copy) works in the same group, since a process group cannot be copied."""

    group: dist.ProcessGroup | None

    def __deepcopy__(self, memo: dict) -> InGroup:
        memo[id(self.group)] = self.group
        clone = copy.copy(self)
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone


def check_block(
    what: str, activation: str, offset: int, size: int, n_latents: int, unit: str = "latents"
) -> None:
    """ValueError unless a latent-sharded `what` (an SAE, a CLT) can hold the block
    [offset, offset + size) of n_latents: a TopK activation, the block inside the dictionary
    (unit: what the messages call its latents)."""
    if activation not in SPARSE_ACTIVATIONS:
        raise ValueError(
            f"a latent-sharded {what} needs activation in {SPARSE_ACTIVATIONS}, not {activation!r}"
        )
    if not 0 <= offset < offset + size <= n_latents:
        raise ValueError(f"{unit} [{offset}, {offset + size}) are not in [0, {n_latents})")


def _merge(local: SparseCode, offset: int, k: int, group) -> SparseCode:
    """The global top-k of every rank's local code (n, <= k), on every rank; this rank's own
    entries keep their gradient."""
    n, k_local = local.values.shape
    values = local.values.detach().new_full((n, k), -torch.inf)
    indices = torch.full((n, k), _PAD_INDEX, dtype=torch.int64, device=values.device)
    values[:, :k_local] = local.values.detach()
    indices[:, :k_local] = local.indices + offset
    world = dist.get_world_size(group)
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(all_values, values, group=group)
    dist.all_gather(all_indices, indices, group=group)
    cand_v, cand_i = torch.cat(all_values, dim=1), torch.cat(all_indices, dim=1)
    # Canonical order: index ascending, then (stable) value descending. (The gathered order is
    # index order already where offsets rise with rank; the sort serves any layout.)
    by_index = torch.sort(cand_i, dim=1, stable=True).indices
    cand_v, cand_i = cand_v.gather(1, by_index), cand_i.gather(1, by_index)
    by_value = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
    out_v, out_i = cand_v.gather(1, by_value), cand_i.gather(1, by_value)
    # This rank's chosen entries take the differentiable local values, found by index.
    proposed = indices[:, :k_local]
    order = proposed.argsort(dim=1)
    in_order = proposed.gather(1, order)
    at = torch.searchsorted(in_order, out_i).clamp(max=k_local - 1)
    own = in_order.gather(1, at) == out_i
    mine = local.values.gather(1, order.gather(1, at))
    return SparseCode(torch.where(own, mine, out_v), out_i)


def _check_shard(W_enc: Tensor, k: int, offset: int, name: str = "k") -> int:
    """min(k, this shard's latents), after checking k, offset and the process group."""
    if not is_int(offset, 0):
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if not dist.is_initialized():
        raise RuntimeError("the sharded ops need torch.distributed (init_process_group)")
    if not is_int(k, 1):
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    return min(k, W_enc.shape[0])


def sharded_encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    offset: int,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> SparseCode:
    """encode_topk over the dictionary sharded across group, exactly.

    x: (n, d) and b_dec: (d,) the same on every rank; W_enc: (m_r, d) and b_enc: (m_r,) this
    rank's latents [offset, offset + m_r) -> SparseCode (n, k) with global indices, the same
    on every rank. k may exceed m_r; it must not exceed the dictionary.
    """
    k_local = _check_shard(W_enc, k, offset)
    x, b_dec = _SumGradients.apply(x, group), _SumGradients.apply(b_dec, group)
    local = encode_topk(x, W_enc, b_enc, b_dec, k_local, backend=backend)
    return _merge(local, offset, k, group)


def sharded_encode_topk_auxk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor,
    k_aux: int,
    *,
    offset: int,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> tuple[SparseCode, SparseCode]:
    """encode_topk_auxk sharded as sharded_encode_topk: dead_mask (m_r,) is this rank's
    latents'; the AuxK code (n, k_aux) is merged the same way, exactly."""
    k_local = _check_shard(W_enc, k, offset)
    k_aux_local = _check_shard(W_enc, k_aux, offset, "k_aux")
    x, b_dec = _SumGradients.apply(x, group), _SumGradients.apply(b_dec, group)
    code, aux = encode_topk_auxk(
        x, W_enc, b_enc, b_dec, k_local, dead_mask, k_aux_local, backend=backend
    )
    return _merge(code, offset, k, group), _merge(aux, offset, k_aux, group)


def sharded_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    *,
    offset: int,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> Tensor:
    """decode of a global code (n, k) with the decoder sharded across group, exactly.

    W_dec: (m_r, d) this rank's rows [offset, offset + m_r); b_dec: (d,) the same on every
    rank -> x_hat (n, d), the same on every rank.
    """
    local_values, local_indices = own_pairs(values, indices, offset, W_dec.shape[0])
    partial = decode(local_values, local_indices, W_dec, torch.zeros_like(b_dec), backend=backend)
    return sum_over_group(partial, group) + b_dec


def own_pairs(values: Tensor, indices: Tensor, offset: int, size: int) -> tuple[Tensor, Tensor]:
    """The pairs of a global code (n, k) on the shard of latents [offset, offset + size):
    their values (zero for the other shards' latents) and their rows of the shard."""
    mine = (indices >= offset) & (indices < offset + size)
    rows = torch.where(mine, indices - offset, torch.zeros_like(indices))
    return values * mine.to(values.dtype), rows


def sum_over_group(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of every rank's t over group, on every rank; its gradient, the same on every
    rank, passes back to each rank's own t (each holds its latents' share of the sum)."""
    return _SumOverGroup.apply(t, group)
