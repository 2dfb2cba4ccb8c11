"""The ``chunked`` backend: the vendor GEMM in latent chunks, a Triton select between them.

For each chunk of latents, torch.addmm (cuBLAS on a GPU, bias folded) writes an (n, c)
block of pre-activations into one of two reused buffers (one on a CPU) sized to stay in L2
(CHUNK_BYTES each, never (n, m)); the select kernel (kernels/select_topk.py) then merges
relu of the block into each row's running top-k, rejecting most elements with one compare
against the row's k-th best so far. The result is exact and canonical, as every backend's.

On a GPU the selects run on a side stream: the GEMM of chunk i + 1 (current stream) overlaps
the select of chunk i, each select waits for its GEMM's event, and a buffer is written again
only after the select that read it has finished. Extra memory: the two buffers and the
(n, KP) running keys. Auto selection never picks this backend (CUDA; CPU under
TRITON_INTERPRET=1): it is asked for by name, and the triton backend runs its encoder where
encoders.choose measured it faster than the fused kernel. AuxK: the dead latents' code by
this same encoder on their rows (pairs.dead_code); backward: the shared pair-sparse one;
decoder: the triton backend's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .pairs import dead_code, pre_chunks
from .registry import Backend, register
from .triton import DTYPES, decode, or_torch, requirement

# Bytes of one of the two pre-activation buffers: both together stay in an H100's 50 MB L2.
CHUNK_BYTES = 8 << 20


def chunk_for(n: int, m: int, itemsize: int) -> int:
    """Latents per chunk so one (n, chunk) block fits in CHUNK_BYTES (at least 128)."""
    chunk = CHUNK_BYTES // (max(n, 1) * itemsize)
    return min(max(chunk // 128 * 128, 128), m)


class _Overlap:
    """The selects on a side stream of a GPU, each after its chunk's GEMM (CPUs run them
    in order, without one)."""

    def __init__(self, device: torch.device) -> None:
        self.main = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)
        self.read: dict[int, torch.cuda.Event] = {}

    def reuse(self, slot: int) -> None:
        """Before the GEMM writes slot again: wait until its last select has read it."""
        self.main.wait_event(self.read[slot])

    def select(self, run: Callable[[], None], slot: int) -> None:
        """run() on the side stream once the current stream's GEMM is done."""
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            run()
        self.read[slot] = self.side.record_event()

    def join(self) -> None:
        self.main.wait_stream(self.side)


def topk_code(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """The TopK code: values (n, k) in x's dtype and int64 indices.  x: (n, d)."""
    from ..kernels import select_topk

    n, m = x.shape[0], W_enc.shape[0]
    chunk = chunk_for(n, m, x.element_size()) if chunk_size is None else chunk_size
    best = select_topk.running(n, k, x.device)
    overlap = _Overlap(x.device) if x.is_cuda else None
    if overlap is None:  # in order: one buffer serves every chunk
        for start, pre, _ in pre_chunks(x - b_dec, W_enc, b_enc, chunk):
            select_topk.select(pre, start, best, k)
    else:
        for start, pre, slot in pre_chunks(x - b_dec, W_enc, b_enc, chunk, 2, overlap.reuse):
            overlap.select(functools.partial(select_topk.select, pre, start, best, k), slot)
        overlap.join()
    return select_topk.finish(best, k, x.dtype)


def encoder_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> tuple[Tensor, ...]:
    """The TopK code (triton loads on the first call; a select that cannot be built for the
    device falls back to the torch backend with one warning), and the AuxK code of the dead
    latents."""
    kernel = functools.partial(topk_code, x, W_enc, b_enc, b_dec, k, chunk_size)
    code = or_torch("select", (x.dtype, k), kernel, x, W_enc, b_enc, b_dec, k, chunk_size)
    if dead_mask is None:
        return code
    return code + dead_code(x, W_enc, b_enc, b_dec, dead_mask, k_aux, encoder_forward, chunk_size)


register(
    Backend(
        name="chunked",
        priority=5,
        encoder_forward=encoder_forward,
        decode=decode,
        device_types=("cuda", "cpu"),
        dtypes=DTYPES,
        auto_device_types=(),
        requirement=requirement,
    )
)
