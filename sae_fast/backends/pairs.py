"""The pair-sparse scaffold every backend shares: the sparse helpers and the encoder's autograd.

A TopK code (values, indices), each (n, k), touches n*k (token, latent) pairs. Three helpers
over those pairs carry every sparse pass; each backend that has its own spells them with
these names and this argument order (W (m, d); coeff, indices (n, k)):
- gather_sum(W, coeff, indices[, bias]) -> (n, d): out[t] = sum_j coeff[t, j] W[indices[t, j]]
  (+ bias): the decoder, and grad x of the encoder;
- scatter_sum(W, coeff, indices, rows) -> (m, d) in W's dtype: out[l] = sum over the pairs
  (t, j) of latent l of coeff[t, j] rows[t], the gradient of gather_sum against rows:
  grad W_dec, grad W_enc (and, with rows of ones, grad b_enc);
- pair_dot(W, g, indices) -> (n, k) fp32: out[t, j] = W[indices[t, j]] . g[t]: grad values.
Here they are plain PyTorch: gather_sum is one embedding_bag with per-sample weights (no
(n, k, d) temporary), scatter_sum its native sparse weight gradient and pair_dot its gradient
of the per-sample weights (the torch backend's decoder needs neither: autograd takes them).
The canonical form of a code (zero_fill), the AuxK code from the dead latents alone
(dead_code) and the chunked encoders' pre-activations (pre_chunks) are shared too.

code_function builds the autograd.Function of an encoder from its forward and a backward
with encoder_backward's contract, which sees only the code's pairs; decode_function that of
a decoder from a backend's three helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_sum(W: Tensor, coeff: Tensor, indices: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[t] = sum_j coeff[t, j] * W[indices[t, j]] (+ bias).  -> (n, d); differentiable."""
    out = F.embedding_bag(indices, W, per_sample_weights=coeff, mode="sum")
    return out if bias is None else out + bias


def scatter_sum(W: Tensor, coeff: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """grad[l] = sum over pairs (t, j) with indices[t, j] == l of coeff[t, j] * rows[t].

    W (m, d) for shape and dtype, rows (n, d) -> (m, d): gather_sum's native weight gradient.
    """
    with torch.enable_grad():
        leaf = W.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(gather_sum(leaf, coeff.to(W.dtype), indices), leaf, rows)
    return grad


def pair_dot(W: Tensor, g: Tensor, indices: Tensor) -> Tensor:
    """out[t, j] = W[indices[t, j]] . g[t] in fp32.  (m, d), (n, d), (n, k) -> (n, k).

    gather_sum's gradient of its per-sample weights (the fallback of the GPU kernels).
    """
    with torch.enable_grad():
        coeff = torch.zeros(indices.shape, dtype=W.dtype, device=W.device, requires_grad=True)
        out = gather_sum(W.detach(), coeff, indices)
        (grad,) = torch.autograd.grad(out, coeff, g.to(W.dtype))
    return grad.float()


def zero_fill(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """A code (n, w) in canonical order whose non-positive entries (a suffix of each row)
    become 0 at the lowest unused latent indices, which all lie in [0, w). NaN stays."""
    n, k = values.shape
    keep = ~(values <= 0)
    slot = torch.where(keep & (indices < k), indices, k)
    used = torch.zeros(n, k + 1, dtype=torch.int8, device=values.device).scatter_(1, slot, 1)
    free = used[:, :k].sort(dim=1, stable=True).indices  # unused indices < k, ascending
    rank = torch.arange(k, device=values.device) - keep.sum(dim=1, keepdim=True)
    fill = free.gather(1, rank.clamp_min(0))
    return torch.where(keep, values, 0.0), torch.where(keep, indices, fill)


def pre_chunks(
    xc: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    chunk: int,
    buffers: int = 1,
    reuse: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, Tensor, int]]:
    """(start, pre, slot) for each chunk of latents, in latent order: pre (n, c) =
    xc @ W_enc[start:start + c].T + b_enc[start:start + c], written by the vendor GEMM into
    buffer slot of `buffers` reused ones (fresh large allocations cost a page fault per page).

    xc: (n, d), x - b_dec. reuse(slot), if given, is called before a slot is written again.
    """
    n, m = xc.shape[0], W_enc.shape[0]
    pool = [xc.new_empty(n * min(chunk, m)) for _ in range(buffers)]
    for number, start in enumerate(range(0, m, chunk)):
        stop, slot = min(start + chunk, m), number % buffers
        if reuse is not None and number >= buffers:
            reuse(slot)
        pre = pool[slot][: n * (stop - start)].view(n, stop - start)
        torch.addmm(b_enc[start:stop], xc, W_enc[start:stop].T, out=pre)
        yield start, pre, slot


def dead_code(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    forward: Callable,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """The AuxK code from the dead latents alone: top k_aux of relu(pre) among them, live ones
    counting as 0, (n, k_aux) each, canonical.

    forward (a backend's encoder forward) runs the TopK encoder on the compacted rows
    W_enc[dead] only, so the code needs no running top-k_aux beside the main one and costs
    a GEMM over the dead latents; their indices map back in order, which keeps ties to the
    lower index, and zero_fill gives the zeros their lowest unused latents.
    """
    dead = dead_mask.nonzero().squeeze(1)
    width = min(k_aux, dead.numel())
    values = x.new_zeros(x.shape[0], k_aux)
    indices = torch.zeros(x.shape[0], k_aux, dtype=torch.int64, device=x.device)
    if width:
        found, local = forward(x, W_enc[dead], b_enc[dead], b_dec, width, None, 0, chunk_size)
        values[:, :width], indices[:, :width] = found, dead[local]
    return zero_fill(values, indices)


Codes = list[tuple[Tensor, Tensor]]  # (values, indices) of each code of one encoder pass


def encoder_backward(
    needs: tuple[bool, ...],
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    codes: Codes,
    grads: list[Tensor],
) -> tuple[Tensor | None, ...]:
    """Gradients (x, W_enc, b_enc, b_dec) of the codes of one encoder pass (the TopK code, and
    the AuxK code with it) from the gradients of their values, over their pairs only.

    needs: which of the four are wanted. The backward of every backend without its own.
    """
    need_x, need_W, need_b_enc, need_b_dec = needs
    values, indices = (torch.cat(parts, dim=1) for parts in zip(*codes, strict=True))
    # ReLU passes gradient only where the selected value is positive; zero fills get none.
    grad_pre = torch.cat(grads, dim=1) * (values > 0)
    grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
    if need_b_enc:
        acc = torch.promote_types(W_enc.dtype, torch.float32)
        grad_b_enc = torch.zeros(W_enc.shape[0], dtype=acc, device=W_enc.device)
        grad_b_enc.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1).to(acc))
        grad_b_enc = grad_b_enc.to(W_enc.dtype)
    if need_x or need_W or need_b_dec:
        # grad_xc[t] = sum_j grad_pre[t, j] W_enc[idx[t, j]]. The weight gradient of that
        # gather-sum against (x - b_dec) is grad W_enc: per pair, grad_pre * (x - b_dec).
        with torch.enable_grad():
            W = W_enc.detach().requires_grad_(need_W)
            grad_xc = gather_sum(W, grad_pre.to(W.dtype), indices)
            if need_W:
                (grad_W_enc,) = torch.autograd.grad(grad_xc, W, x - b_dec)
        grad_xc = grad_xc.detach()
        if need_x:
            grad_x = grad_xc
        if need_b_dec:
            grad_b_dec = -grad_xc.sum(dim=0)
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec


DOUBLE_BACKWARD = (
    "sae_fast's sparse ops have no second derivative: backward with create_graph=True "
    "(double backward, e.g. a gradient penalty) through encode_topk or decode is not "
    "supported; compute that term with sae_fast.reference's dense ops"
)


def _body(fwd: Callable, bwd: Callable) -> dict:
    """The Function body of fwd and bwd, refusing double backward (with once_differentiable,
    torch.autograd.grad would answer it with None, dropping the second-order term)."""

    def first_order(ctx, *grads):
        if torch.is_grad_enabled():  # autograd enables grad in backward for create_graph only
            raise RuntimeError(DOUBLE_BACKWARD)
        return bwd(ctx, *grads)

    return {"forward": staticmethod(fwd), "backward": staticmethod(first_order)}


def code_function(name: str, forward: Callable, backward: Callable = encoder_backward) -> type:
    """The autograd.Function of a TopK (+ AuxK) encoder.

    apply(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) runs forward(same
    arguments) -> (values, indices[, aux_values, aux_indices]); dead_mask None gives the TopK
    code alone. backward has encoder_backward's contract and sees only the codes' pairs; each
    code is the forward's own tensors, on which the cuda backend keys its index cache.
    """

    def fwd(ctx, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size):
        outputs = forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size)
        ctx.save_for_backward(x, W_enc, b_dec, *outputs)
        ctx.mark_non_differentiable(*outputs[1::2])
        return outputs

    def bwd(ctx, *grads):
        x, W_enc, b_dec, *outputs = ctx.saved_tensors
        codes = list(zip(outputs[0::2], outputs[1::2], strict=True))
        grads = backward(ctx.needs_input_grad[:4], x, W_enc, b_dec, codes, list(grads[0::2]))
        return (*grads, None, None, None, None)

    return type(name, (torch.autograd.Function,), _body(fwd, bwd))


def decode_function(
    name: str, gather_sum: Callable, scatter_sum: Callable, pair_dot: Callable
) -> type:
    """The autograd.Function of a sparse decoder built from a backend's helpers.

    apply(values, indices, W_dec, b_dec) -> x_hat = gather_sum(W_dec, values, indices, b_dec);
    backward: grad values by pair_dot, grad W_dec by scatter_sum, grad b_dec the column sum
    accumulated in fp32.
    """

    def fwd(ctx, values, indices, W_dec, b_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return gather_sum(W_dec, values, indices, b_dec)

    def bwd(ctx, grad_x_hat):
        values, indices, W_dec = ctx.saved_tensors
        grad_v = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_v = pair_dot(W_dec, grad_x_hat, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_sum(W_dec, values, indices, grad_x_hat)
        if ctx.needs_input_grad[3]:
            grad_b = grad_x_hat.float().sum(dim=0).to(W_dec.dtype)
        return grad_v, None, grad_W, grad_b

    return type(name, (torch.autograd.Function,), _body(fwd, bwd))
