"""The ``cuda`` backend: the csrc/ sparse backward (sae_fast._C), forward from triton or torch.

Backward over the n*k (token, latent) pairs of a TopK code:
- a latent-major index of the pairs (a stable sort by latent, cut into work items of at most
  ITEM_PAIRS pairs so a hot latent spreads over blocks), built once per step and shared by
  the decoder's and the encoder's backward;
- grad W_dec, grad W_enc, grad b_enc: each latent's row summed in fp32 in pair order and
  written once (no atomics: bitwise deterministic);
- grad values, grad x: row dot products and row gathers per token.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends, torch_topk, triton_backend
from .torch_topk import code_function

ITEM_PAIRS = 256  # pairs per work item of the latent-major gradients


@functools.cache
def _extension():
    """sae_fast._C, or the reason it cannot be used."""
    try:
        return importlib.import_module("sae_fast._C")
    except ImportError as e:
        return f"the CUDA extension sae_fast._C is not built ({e}); reinstall with nvcc on PATH"


def why_not(device: torch.device) -> str | None:
    ext = _extension()
    if isinstance(ext, str):
        return ext
    if device.type != "cuda":
        return "the CUDA extension runs on CUDA tensors"
    return None


def _dtype_code(dtype: torch.dtype) -> int:
    codes = _extension().DTYPES
    name = str(dtype).removeprefix("torch.")
    if name not in codes:
        raise TypeError(f"the cuda backend takes float32, float16 or bfloat16, got {dtype}")
    return codes[name]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@dataclass
class LatentIndex:
    """The n*k pairs of a code (n, k), latent-major, cut into work items."""

    indices: Tensor  # the code's indices, held so their memory cannot be reused while cached
    n_latents: int
    order: Tensor  # (n*k,) pair ids sorted stably by latent
    token: Tensor  # (n*k,) token of each sorted pair
    item_latent: Tensor
    item_start: Tensor
    item_end: Tensor
    item_slot: Tensor  # -1: the latent's only item; else its row in the fp32 workspace
    split_latent: Tensor  # latents with several items, and their workspace rows
    split_start: Tensor
    split_end: Tensor

    @classmethod
    def build(cls, indices: Tensor, n_latents: int) -> LatentIndex:
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=n_latents)
        ends = counts.cumsum(0)
        used = counts.nonzero().squeeze(1)
        per = (counts[used] + ITEM_PAIRS - 1) // ITEM_PAIRS  # work items per used latent
        item_latent = used.repeat_interleave(per)
        first_item = per.cumsum(0) - per
        within = torch.arange(item_latent.numel(), device=flat.device)
        within -= first_item.repeat_interleave(per)
        latent_start = (ends - counts)[item_latent]
        item_start = latent_start + within * ITEM_PAIRS
        item_end = torch.minimum(item_start + ITEM_PAIRS, ends[item_latent])
        split = per > 1
        slot_counts = torch.where(split, per, 0)
        slot_first = slot_counts.cumsum(0) - slot_counts
        item_slot = torch.where(
            split.repeat_interleave(per), slot_first.repeat_interleave(per) + within, -1
        )
        return cls(
            indices, n_latents, order, order // k, item_latent, item_start, item_end, item_slot,
            used[split], slot_first[split], (slot_first + slot_counts)[split],
        )  # fmt: skip

    @property
    def workspace_rows(self) -> int:
        return int(self.split_end[-1]) if self.split_end.numel() else 0


_cached: list[LatentIndex] = []


def latent_index(indices: Tensor, n_latents: int) -> LatentIndex:
    """The index of these pairs: built once per step, reused by decoder and encoder backward."""
    if _cached:
        hit = _cached[0]
        if (
            hit.n_latents == n_latents
            and hit.indices.data_ptr() == indices.data_ptr()
            and hit.indices.shape == indices.shape
            and hit.indices._version == indices._version
        ):
            return hit
    index = LatentIndex.build(indices, n_latents)
    _cached[:] = [index]
    return index


def segment_rows(index: LatentIndex, coeff: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """out[l] = sum over pairs (t, j) of latent l of coeff[t, j] * rows[t].  -> (m, d) in dtype."""
    rows = rows.to(dtype).contiguous()
    d = rows.shape[1]
    out = torch.zeros(index.n_latents, d, dtype=dtype, device=rows.device)
    workspace = torch.empty(index.workspace_rows, d, dtype=torch.float32, device=rows.device)
    coeff = coeff.reshape(-1)[index.order].float().contiguous()
    ptrs = [t.data_ptr() for t in (out, workspace, rows, coeff, index.token)]
    ptrs += [t.data_ptr() for t in (index.item_latent, index.item_start, index.item_end)]
    ptrs += [t.data_ptr() for t in (index.item_slot, index.split_latent, index.split_start)]
    ptrs.append(index.split_end.data_ptr())
    sizes = (index.item_latent.numel(), index.split_latent.numel(), d, rows.stride(0))
    _extension().segment_rows(*ptrs, *sizes, _dtype_code(dtype), _stream(rows.device))
    return out


def pair_dot(W: Tensor, g: Tensor, indices: Tensor) -> Tensor:
    """out[t, j] = W[indices[t, j]] . g[t] in fp32.  (m, d), (n, d), (n, k) -> (n, k)."""
    n, k = indices.shape
    W, g, indices = W.contiguous(), g.to(W.dtype).contiguous(), indices.contiguous()
    out = torch.empty(n, k, dtype=torch.float32, device=W.device)
    args = (out.data_ptr(), W.data_ptr(), g.data_ptr(), indices.data_ptr(), n, k, W.shape[1])
    _extension().pair_dot(*args, g.stride(0), _dtype_code(W.dtype), _stream(W.device))
    return out


def gather_sum(W: Tensor, coeff: Tensor, indices: Tensor) -> Tensor:
    """out[t] = sum_j coeff[t, j] * W[indices[t, j]].  -> (n, d) in W's dtype."""
    n, k = indices.shape
    W, indices = W.contiguous(), indices.contiguous()
    coeff = coeff.float().contiguous()
    out = torch.empty(n, W.shape[1], dtype=W.dtype, device=W.device)
    args = (out.data_ptr(), W.data_ptr(), coeff.data_ptr(), indices.data_ptr(), n, k, W.shape[1])
    _extension().gather_sum(*args, _dtype_code(W.dtype), _stream(W.device))
    return out


def encoder_backward(needs, x, W_enc, b_dec, values, indices, grad_values):
    """torch_topk.encoder_backward's contract, by the CUDA kernels."""
    need_x, need_W, need_b_enc, need_b_dec = needs
    grad_pre = (grad_values * (values > 0)).float()
    grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
    if need_W or need_b_enc:
        index = latent_index(indices, W_enc.shape[0])
        if need_W:
            grad_W_enc = segment_rows(index, grad_pre, x - b_dec, W_enc.dtype)
        if need_b_enc:
            ones = torch.ones(x.shape[0], 1, dtype=W_enc.dtype, device=x.device)
            grad_b_enc = segment_rows(index, grad_pre, ones, W_enc.dtype).view(-1)
    if need_x or need_b_dec:
        grad_xc = gather_sum(W_enc, grad_pre, indices)
        if need_x:
            grad_x = grad_xc.to(x.dtype)
        if need_b_dec:
            grad_b_dec = -grad_xc.float().sum(dim=0).to(b_dec.dtype)
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec


def _forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> tuple[Tensor, ...]:
    """The fused Triton forward where it can run, else the torch backend's chunked one."""
    if triton_backend.why_not(x.device) is None:
        from .kernels.encode_topk import fused_forward

        return fused_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size)
    return torch_topk.topk_forward(x, W_enc, b_enc, b_dec, k, chunk_size, dead_mask, k_aux)


# TopK (+ AuxK) code with the backward of the CUDA extension.
CudaEncodeTopK = code_function("CudaEncodeTopK", _forward, encoder_backward)


class CudaDecode(torch.autograd.Function):
    """x_hat = sum_j values[:, j] W_dec[indices[:, j]] + b_dec; backward by the CUDA extension."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return gather_sum(W_dec, values, indices) + b_dec

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_hat):
        values, indices, W_dec = ctx.saved_tensors
        grad_v = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_v = pair_dot(W_dec, grad_x_hat, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:
            index = latent_index(indices, W_dec.shape[0])
            grad_W = segment_rows(index, values, grad_x_hat, W_dec.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = grad_x_hat.float().sum(dim=0).to(W_dec.dtype)
        return grad_v, None, grad_W, grad_b


def encode_topk(x, W_enc, b_enc, b_dec, k, chunk_size):
    return CudaEncodeTopK.apply(x, W_enc, b_enc, b_dec, k, None, 0, chunk_size)


backends.register(
    backends.Backend(
        name="cuda",
        priority=20,
        why_not=why_not,
        encode_topk=encode_topk,
        encode_topk_auxk=CudaEncodeTopK.apply,
        decode=CudaDecode.apply,
        auto_device_types=("cuda",),
    )
)
