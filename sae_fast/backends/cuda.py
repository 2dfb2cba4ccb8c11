"""The ``cuda`` backend: the csrc/ sparse backward (sae_fast._C), forward from triton or torch.

Runs on CUDA tensors in float32, float16 and bfloat16 when the extension is built.

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
from typing import ClassVar

import torch
from torch import Tensor

from ..validation import dtype_name
from .pairs import decode_function
from .registry import Backend, get, register

ITEM_PAIRS = 256  # pairs per work item of the latent-major gradients
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what sae_fast._C dispatches on


@functools.cache
def _extension():
    """sae_fast._C, or the reason it cannot be used."""
    try:
        return importlib.import_module("sae_fast._C")
    except ImportError as e:
        return f"the CUDA extension sae_fast._C is not built ({e}); reinstall with nvcc on PATH"


def requirement(device: torch.device) -> str | None:
    """None if the extension is built, else why it cannot be used."""
    ext = _extension()
    return ext if isinstance(ext, str) else None


def _dtype_code(dtype: torch.dtype) -> int:
    return _extension().DTYPES[dtype_name(dtype)]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@dataclass
class LatentIndex:
    """The n*k pairs of a code (n, k), latent-major, cut into work items.

    Built on the device with shapes known from (n, k, m) alone, so nothing waits for the GPU:
    the item and split arrays have an upper bound of entries, and those past the real ones
    name latent -1 (the kernels skip them).
    """

    indices: Tensor  # the code's indices, held so their memory cannot be reused while cached
    n_latents: int
    order: Tensor  # (n*k,) pair ids sorted stably by latent
    token: Tensor  # (n*k,) token of each sorted pair
    item_latent: Tensor  # (items,) the latent of each work item, -1 past the real ones
    item_start: Tensor  # first and one-past-last sorted pair of each item
    item_end: Tensor
    item_slot: Tensor  # -1: the latent's only item; else its row in the fp32 workspace
    split_latent: Tensor  # (splits,) latents with several items, -1 past the real ones
    split_start: Tensor  # their workspace rows
    split_end: Tensor
    # The fields sae_fast._C.scatter_sum reads, by their argument names there.
    KERNEL_ARGS: ClassVar[tuple[str, ...]] = (
        "token", "item_latent", "item_start", "item_end", "item_slot", "split_latent",
        "split_start", "split_end",
    )  # fmt: skip

    @classmethod
    def build(cls, indices: Tensor, n_latents: int) -> LatentIndex:
        n, k = indices.shape
        pairs, device = n * k, indices.device
        flat = indices.reshape(-1)
        latent, order = torch.sort(flat, stable=True)
        counts = torch.zeros(n_latents, dtype=torch.int64, device=device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        ends = counts.cumsum(0)
        starts = ends - counts
        position = torch.arange(pairs, device=device)
        within = position - starts[latent]  # a pair's rank within its latent
        first = within % ITEM_PAIRS == 0  # a work item starts here
        items, splits = _bounds(pairs, n_latents)
        # Each item's first pair, by a scatter with the other pairs sent to a spare entry.
        item_of = torch.where(first, first.cumsum(0) - 1, items)
        item_start = torch.full((items + 1,), pairs, dtype=torch.int64, device=device)
        item_start = item_start.scatter_(0, item_of, position)[:items]
        real = item_start < pairs
        item_latent = torch.where(real, latent[item_start.clamp(max=max(pairs - 1, 0))], -1)
        known = item_latent.clamp(min=0)
        item_end = torch.where(
            real, torch.minimum(item_start + ITEM_PAIRS, ends[known]), item_start
        )
        split = real & (counts[known] > ITEM_PAIRS)
        item_slot = torch.where(split, split.cumsum(0) - 1, -1)
        # A split latent's items are consecutive, so are its workspace rows.
        lead = split & (item_start == starts[known])
        slot_of = torch.where(lead, lead.cumsum(0) - 1, splits)
        split_latent = torch.full((splits + 1,), -1, dtype=torch.int64, device=device)
        split_latent = split_latent.scatter_(0, slot_of, item_latent)[:splits]
        split_start = torch.zeros(splits + 1, dtype=torch.int64, device=device)
        split_start = split_start.scatter_(0, slot_of, item_slot)[:splits]
        per = (counts[split_latent.clamp(min=0)] + ITEM_PAIRS - 1) // ITEM_PAIRS
        split_end = torch.where(split_latent >= 0, split_start + per, split_start)
        return cls(
            indices, n_latents, order, order // k, item_latent, item_start, item_end, item_slot,
            split_latent, split_start, split_end,
        )  # fmt: skip

    @property
    def workspace_rows(self) -> int:
        """An upper bound on the split latents' items, from the sizes alone."""
        return self.order.numel() // ITEM_PAIRS + self.split_latent.numel()


def _bounds(pairs: int, n_latents: int) -> tuple[int, int]:
    """Upper bounds of the work items and of the latents with several, from the sizes alone:
    a latent with c pairs has ceil(c / ITEM_PAIRS) <= c // ITEM_PAIRS + 1 items, several only
    when c > ITEM_PAIRS."""
    return pairs // ITEM_PAIRS + min(n_latents, pairs), pairs // (ITEM_PAIRS + 1)


_cached: list[LatentIndex] = []
_CACHED = 2  # the TopK code's index and the AuxK code's: each serves decoder and encoder


def latent_index(indices: Tensor, n_latents: int) -> LatentIndex:
    """The index of these pairs: built once per step for each code, reused by its decoder's
    and the encoder's backward."""
    for hit in _cached:
        if (
            hit.n_latents == n_latents
            and hit.indices.data_ptr() == indices.data_ptr()
            and hit.indices.shape == indices.shape
            and hit.indices._version == indices._version
        ):
            return hit
    index = LatentIndex.build(indices, n_latents)
    _cached[:] = [index, *_cached][:_CACHED]
    return index


def _launch(kernel: str, like: Tensor, **args: Tensor | int) -> None:
    """sae_fast._C.<kernel>(...) with every argument by name, tensors as device pointers, and
    the dtype code and current stream of like (the operand whose dtype the kernel runs in), on
    like's device: the extension launches on the current one."""
    ptrs = {name: v.data_ptr() if isinstance(v, Tensor) else v for name, v in args.items()}
    with torch.cuda.device_of(like):
        dtype, stream = _dtype_code(like.dtype), _stream(like.device)
        getattr(_extension(), kernel)(**ptrs, dtype=dtype, stream=stream)


def scatter_sum(
    W: Tensor, coeff: Tensor, indices: Tensor, rows: Tensor, out: Tensor | None = None
) -> Tensor:
    """out[l] = sum over pairs (t, j) of latent l of coeff[t, j] * rows[t].

    W (m, d') for the latent count and dtype, rows (n, d) -> (m, d) in W's dtype; the
    latent-major index of indices is built once per step (latent_index). out: add the sums to
    this (m, d) tensor, in W's dtype or fp32, instead of to zeros.
    """
    index = latent_index(indices, W.shape[0])
    rows = rows.to(W.dtype).contiguous()
    d = rows.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.zeros(index.n_latents, d, dtype=W.dtype, device=rows.device)
    _launch(
        "scatter_sum",
        rows,
        out=out,
        workspace=torch.empty(index.workspace_rows, d, dtype=torch.float32, device=rows.device),
        rows=rows,
        coeff=coeff.reshape(-1)[index.order].float().contiguous(),
        **{name: getattr(index, name) for name in LatentIndex.KERNEL_ARGS},
        items=index.item_latent.numel(),
        split_latents=index.split_latent.numel(),
        d=d,
        row_stride=rows.stride(0),
        accumulate=accumulate,
        out_dtype=_dtype_code(out.dtype),
    )
    return out


def pair_dot(W: Tensor, g: Tensor, indices: Tensor) -> Tensor:
    """out[t, j] = W[indices[t, j]] . g[t] in fp32.  (m, d), (n, d), (n, k) -> (n, k)."""
    (n, k), d = indices.shape, W.shape[1]
    W, g, indices = W.contiguous(), g.to(W.dtype).contiguous(), indices.contiguous()
    out = torch.empty(n, k, dtype=torch.float32, device=W.device)
    _launch("pair_dot", W, out=out, W=W, g=g, indices=indices, n=n, k=k, d=d, g_stride=g.stride(0))
    return out


def gather_sum(W: Tensor, coeff: Tensor, indices: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[t] = sum_j coeff[t, j] * W[indices[t, j]] (+ bias).  -> (n, d) in W's dtype."""
    (n, k), d = indices.shape, W.shape[1]
    W, indices, coeff = W.contiguous(), indices.contiguous(), coeff.float().contiguous()
    out = torch.empty(n, d, dtype=W.dtype, device=W.device)
    _launch("gather_sum", W, out=out, W=W, coeff=coeff, indices=indices, n=n, k=k, d=d)
    return out if bias is None else out + bias


def encoder_backward(needs, x, W_enc, b_dec, codes, grads):
    """pairs.encoder_backward's contract, by the CUDA kernels. The latent-major gradients run
    code by code, each on the index its decoder's backward built (with AuxK: two codes); with
    several, the sums are held in fp32 until the last code is added, so a 16-bit W_enc's
    gradient is rounded once, as with one code."""
    need_x, need_W, need_b_enc, need_b_dec = needs
    grad_pres = [(g * (values > 0)).float() for (values, _), g in zip(codes, grads, strict=True)]
    grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
    xc = x - b_dec if need_W else None
    ones = torch.ones(x.shape[0], 1, dtype=W_enc.dtype, device=x.device) if need_b_enc else None
    if len(codes) > 1:
        m, d = W_enc.shape
        held = functools.partial(torch.zeros, dtype=torch.float32, device=x.device)
        grad_W_enc = held(m, d) if need_W else None
        grad_b_enc = held(m, 1) if need_b_enc else None
    for (_, indices), grad_pre in zip(codes, grad_pres, strict=True):
        if need_W:
            grad_W_enc = scatter_sum(W_enc, grad_pre, indices, xc, grad_W_enc)
        if need_b_enc:
            grad_b_enc = scatter_sum(W_enc, grad_pre, indices, ones, grad_b_enc)
    if need_W:
        grad_W_enc = grad_W_enc.to(W_enc.dtype)
    if need_b_enc:
        grad_b_enc = grad_b_enc.view(-1).to(W_enc.dtype)
    if need_x or need_b_dec:
        indices = torch.cat([indices for _, indices in codes], dim=1)
        grad_xc = gather_sum(W_enc, torch.cat(grad_pres, dim=1), indices)
        if need_x:
            grad_x = grad_xc.to(x.dtype)
        if need_b_dec:
            grad_b_dec = -grad_xc.float().sum(dim=0).to(b_dec.dtype)
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec


def encoder_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> tuple[Tensor, ...]:
    """The triton backend's fused forward where it can run on x, else the torch backend's."""
    forward = get("triton") if get("triton").why_not(x) is None else get("torch")
    return forward.encoder_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size)


# The sparse decoder with the backward of the CUDA extension.
decode = decode_function("CudaDecode", gather_sum, scatter_sum, pair_dot).apply


register(
    Backend(
        name="cuda",
        priority=20,
        encoder_forward=encoder_forward,
        decode=decode,
        encoder_backward=encoder_backward,
        device_types=("cuda",),
        dtypes=DTYPES,
        auto_device_types=("cuda",),
        requirement=requirement,
    )
)
