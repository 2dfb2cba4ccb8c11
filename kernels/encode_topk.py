"""Fused encoder -> ReLU -> TopK in Triton: only (n, k) keys per latent split reach memory.

Each program takes BLOCK_N rows and one split of the latents, and streams over latent tiles:
the tile's pre-activations (x - b_dec) @ W_enc[tile].T + b_enc accumulate in fp32 with
tl.dot (x - b_dec is formed once, before the launch), go through ReLU (NaN propagates), are
rounded to x's dtype (so order follows the values returned) and become keys: the value's bits
above the bit-flipped latent index. Integer order on keys is the canonical order (values
descending, ties to the lower index; zeros at the lowest indices). For 16-bit inputs a key is
int32, (value << 16) | (0xFFFF - index in the split), with splits of at most 2^16 - 1 latents;
for float32 it is int64, (value << 32) | (0xFFFFFFFF - index). Key 0 is "none".

Selection is light. Each row keeps its running best KP keys, sorted, and their k-th, the
threshold; a tile's key counts only if it beats its row's threshold. Per tile:
- no row has a candidate (most tiles, once the threshold is high): one compare per key;
- no row has more than LIGHT: the candidates go, largest first, into a buffer of BUF keys a
  row, which joins the running best (one sort and one bitonic merge) only when it would
  overflow, before a full tile, and at the end;
- else (the first tiles): the tile's top KP joins the running best by one bitonic merge.
The threshold is stale while candidates wait, which lets more keys through, never fewer, so
the first k of the running best stay exact; the rest are not kept exact, so a program stores
k keys, and with few rows the (n, splits, k) lists of the splits merge in a small torch top-k.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sae_fast.kernels import interpreting
from sae_fast.kernels.launch import Launch

# Kernels spell these masks as literals: they can read no Python global, and the interpreter
# cannot take a global tl.constexpr in arithmetic.
_LOW16, _LOW32 = 0xFFFF, 0xFFFFFFFF
SPLIT16 = (1 << 16) - 1  # latents a split may hold with int32 keys (index 65535 would be key 0)
# Env switch: autotune the encoder's tiles instead of the pinned config (compiles them all).
AUTOTUNE_ENV = "SAE_FAST_AUTOTUNE"


@triton.jit
def ascending(cand, C: tl.constexpr, KP: tl.constexpr):
    """cand (rows, C) descending as a KP-wide ascending sequence: zeros, then cand reversed."""
    up = tl.flip(cand, 1)
    if C < KP:
        rows: tl.constexpr = up.shape[0]
        wide = tl.reshape(tl.broadcast_to(up[:, None, :], (rows, KP // C, C)), (rows, KP))
        last = (tl.arange(0, KP) // C) == (KP // C - 1)
        up = tl.where(last[None, :], wide, 0)
    return up


@triton.jit
def merge_candidates(best, up, K: tl.constexpr, KP: tl.constexpr):
    """best (rows, KP) descending with up (rows, KP) ascending: the top KP of both, and the
    k-th of them (the new threshold)."""
    best = tl.bitonic_merge(tl.maximum(best, up), descending=True)
    theta = tl.max(tl.where(tl.arange(0, KP)[None, :] == K - 1, best, 0), 1)
    return best, theta


@triton.jit
def flush(best, buf, K: tl.constexpr, KP: tl.constexpr, BUF: tl.constexpr):
    """best with the candidate buffer (rows, BUF), unsorted, merged in; and the threshold."""
    up = ascending(tl.sort(buf, 1, descending=True), BUF, KP)
    return merge_candidates(best, up, K, KP)


@triton.jit
def keys_of(acts, index, VALUE16: tl.constexpr):
    """int64 keys of acts (rows, cols) >= 0 at latents index (cols,): the value's own bits
    (16 or 32) over the bit-flipped index, the layout unkey reads."""
    if VALUE16:  # & 0x7FFF: -0.0 sorts as 0.0
        value = acts.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        value = acts.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return (value.to(tl.int64) << 32) | (0xFFFFFFFF - index.to(tl.int64))[None, :]


@triton.jit
def encode_topk_kernel(
    XC, W, B_ENC, KEYS,
    n, d, m, m_per_split, stride_xn, stride_wm, stride_kn, stride_ks,
    K: tl.constexpr, KP: tl.constexpr, LIGHT: tl.constexpr, BUF: tl.constexpr,
    KEY16: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PROBE: tl.constexpr = 0,
):  # fmt: skip
    # PROBE: 0 in every launch; the compile benchmark sets 1 to 4 to compile one part of the
    # tile's selection alone (skip, light, full: each without its flush; flush) and count its
    # instructions.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    x_rows = XC + rows.to(tl.int64)[:, None] * stride_xn  # int64: n * d may pass 2^31
    lo = tl.program_id(1) * m_per_split
    hi = tl.minimum(lo + m_per_split, m)
    key_type = tl.int32 if KEY16 else tl.int64
    best = tl.zeros((BLOCK_N, KP), dtype=key_type)
    theta = tl.zeros((BLOCK_N,), dtype=key_type)
    # Light tiles' candidates wait in buf (fill per row) and join best BUF at a time.
    buf = tl.zeros((BLOCK_N, BUF), dtype=key_type)
    fill = tl.zeros((BLOCK_N,), dtype=tl.int32)
    slots = tl.arange(0, BUF)
    for tile in range(lo, hi, BLOCK_M):
        cols = tile + tl.arange(0, BLOCK_M)
        col_ok = cols < hi
        w_rows = W + cols.to(tl.int64)[:, None] * stride_wm  # int64: m * d may pass 2^31
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            x = tl.load(x_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        b_enc = tl.load(B_ENC + cols, mask=col_ok, other=0.0).to(tl.float32)
        acts = tl.maximum(acc + b_enc[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
        acts = acts.to(XC.dtype.element_ty)
        if KEY16:  # & 0x7FFF: -0.0 sorts as 0.0
            value = acts.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
            tile_keys = (value << 16) | (0xFFFF - (cols - lo))[None, :]
        else:
            tile_keys = keys_of(acts, cols, False)
        beats = (tile_keys > theta[:, None]) & col_ok[None, :]
        tile_keys = tl.where(beats, tile_keys, 0)
        count = tl.sum(beats.to(tl.int32), 1)
        most = tl.max(count, 0)  # candidates of the busiest row
        full = (most > LIGHT) & (PROBE == 0) | (PROBE == 3)
        light = (most > 0) & (most <= LIGHT) & (PROBE == 0) | (PROBE == 2)
        if full:  # the buffer first, then the tile's top KP
            # A loop of 0 or 1 trips, not an if: Triton's layout pass keeps loop-carried values
            # in one layout, where an if that yields a merged best may not compile.
            for _ in range(((tl.max(fill, 0) > 0) & (PROBE == 0)).to(tl.int32)):
                best, theta = flush(best, buf, K, KP, BUF)
                buf = tl.zeros((BLOCK_N, BUF), dtype=key_type)
                fill = tl.zeros((BLOCK_N,), dtype=tl.int32)
            up = ascending(tl.topk(tile_keys, KP), KP, KP)
            best, theta = merge_candidates(best, up, K, KP)
        if light:  # at most LIGHT candidates a row: into the buffer, largest first
            for _ in range(((tl.max(fill + count, 0) > BUF) & (PROBE == 0)).to(tl.int32)):
                best, theta = flush(best, buf, K, KP, BUF)
                buf = tl.zeros((BLOCK_N, BUF), dtype=key_type)
                fill = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for _ in range(most):  # per row, the largest candidate left
                top = tl.max(tile_keys, 1)
                tile_keys = tl.where(tile_keys == top[:, None], 0, tile_keys)
                slot = (slots[None, :] == fill[:, None]) & (top > 0)[:, None]
                buf = tl.where(slot, top[:, None], buf)
                fill += (top > 0).to(tl.int32)
        if PROBE == 1:  # keeps the tile's work alive (stored), as a merge would
            best += most
        if PROBE == 4:
            best, theta = flush(best, buf, K, KP, BUF)
            buf += most
    for _ in range((tl.max(fill, 0) > 0).to(tl.int32)):
        best, theta = flush(best, buf, K, KP, BUF)
    ks = tl.arange(0, KP)
    out = KEYS + rows.to(tl.int64)[:, None] * stride_kn + tl.program_id(1) * stride_ks
    tl.store(out + ks[None, :], best, mask=row_ok[:, None] & (ks[None, :] < K))


@dataclass(frozen=True)
class Tiles:
    """A launch config of the encoder: tile sizes, warps and pipeline stages."""

    block_n: int
    block_m: int
    block_d: int
    warps: int
    stages: int

    def fit(self, kp: int) -> Tiles:
        """These tiles for a running top-kp: tl.topk needs block_m >= kp, and block_n * kp
        keys of the running best must fit the registers."""
        block_m = max(self.block_m, kp)
        return Tiles(min(self.block_n, max(16, 8192 // kp)), block_m, self.block_d, self.warps,
                     self.stages)  # fmt: skip

    def meta(self) -> dict:
        return {"BLOCK_N": self.block_n, "BLOCK_M": self.block_m, "BLOCK_D": self.block_d}


# The pinned config per (compute capability major, 16-bit input): compiled once, chosen at
# compile level (python -m benchmarks kernels). SAE_FAST_AUTOTUNE=1 tunes among CANDIDATES.
PINNED = {
    (9, True): Tiles(64, 128, 64, 8, 3),
    (9, False): Tiles(64, 64, 32, 8, 3),
    (8, True): Tiles(64, 128, 64, 8, 3),
    (8, False): Tiles(64, 64, 32, 8, 3),
}
CANDIDATES = (
    Tiles(128, 128, 64, 8, 3),
    Tiles(64, 128, 64, 4, 3),
    Tiles(64, 64, 64, 4, 4),
    Tiles(64, 128, 32, 4, 4),
    Tiles(32, 128, 64, 4, 3),
)
_INTERPRETED = Tiles(16, 32, 16, 1, 1)  # the interpreter is ~1000x slower than a GPU
LIGHT = 8  # light tiles: no row has more candidates than this
BUF = 32  # candidates a row holds from light tiles before they join its running best


def pinned(capability: tuple[int, int], dtype: torch.dtype) -> Tiles:
    """The pinned tiles for a GPU of this compute capability and an input dtype."""
    major = 9 if capability[0] >= 9 else 8
    return PINNED[(major, dtype != torch.float32)]


WGMMA_ROWS = 64  # Hopper's warpgroup MMA takes tiles of at least 64 rows
FP32_SPILLS_AT = 128  # fp32: a running best of this many keys per row spills on sm_90


def cliff(capability: tuple[int, int], dtype: torch.dtype, d: int, k: int) -> str | None:
    """Why the fused kernel compiles badly for this shape on a GPU of capability (read from
    its sm_90 binary, benchmarks/compile.py; tests/test_kernels_compile.py holds the rule to
    it), or None. The triton backend runs the chunked encoder for these shapes."""
    if capability[0] < 9:
        return None
    kp = triton.next_power_of_2(k)
    rows = pinned(capability, dtype).fit(kp).block_n
    if dtype == torch.float32:
        if kp >= FP32_SPILLS_AT:
            return f"its running best of {rows} rows x {kp} float32 keys spills"
        return None
    if rows < WGMMA_ROWS:
        return f"k={k} leaves {rows}-row tiles, below wgmma's {WGMMA_ROWS}: mma.sync, spills"
    if d * dtype.itemsize % 16:
        return f"rows of d={d} 16-bit values are not 16-byte aligned: no cp.async"
    return None


@functools.cache
def _device(device_index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(device_index)
    return (props.major, props.minor), props.multi_processor_count


def splits_for(n: int, m: int, block_n: int, sm_count: int) -> int:
    """Latent splits so that about one program per SM runs when row blocks alone are few."""
    row_blocks = triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(sm_count, row_blocks), triton.cdiv(m, 256)))


def plan(
    xc: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    tiles: Tiles | None = None,
    sm_count: int | None = None,
) -> Launch:
    """The launch that writes the top k keys of relu(xc @ W_enc.T + b_enc) per row and split.

    xc (n, d) = x - b_dec and W_enc (m, d) with contiguous rows; the keys go to a new
    (n, splits, k) tensor, args[3]: int32 for 16-bit inputs, int64 for float32. tiles,
    sm_count: the GPU's (the current device's pinned tiles and multiprocessor count when
    None).
    """
    n, d = xc.shape
    m = W_enc.shape[0]
    kp = triton.next_power_of_2(k)
    autotune = os.environ.get(AUTOTUNE_ENV) == "1"
    if interpreting():
        tiles, splits, autotune = _INTERPRETED.fit(kp), (1 if m <= 64 else 2), False
    else:
        if tiles is None or sm_count is None:
            capability, count = _device(xc.device.index or 0)
            tiles, sm_count = tiles or pinned(capability, xc.dtype), sm_count or count
        tiles = tiles.fit(kp)
        splits = splits_for(n, m, tiles.block_n, sm_count)
    key16 = xc.dtype != torch.float32
    if key16:  # int32 keys index a split's latents in 16 bits
        splits = max(splits, triton.cdiv(m, SPLIT16))
    key_dtype = torch.int32 if key16 else torch.int64
    keys = torch.empty(n, splits, k, dtype=key_dtype, device=xc.device)
    meta = {
        "K": k,
        "KP": kp,
        "LIGHT": LIGHT if kp > LIGHT else 0,  # 0: no light path (it would be the full one)
        "BUF": min(BUF, kp),
        "KEY16": key16,
        "IEEE": xc.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
    }
    args = (xc, W_enc, b_enc, keys, n, d, m, triton.cdiv(m, splits))
    args += (xc.stride(0), W_enc.stride(0), keys.stride(0), keys.stride(1))
    grid = (triton.cdiv(n, tiles.block_n), splits)
    if autotune:
        return Launch(_autotuned(kp), lambda tuned: (triton.cdiv(n, tuned["BLOCK_N"]), splits),
                      args, meta)  # fmt: skip
    if not interpreting():
        meta |= {"num_warps": tiles.warps, "num_stages": tiles.stages}
    return Launch(encode_topk_kernel, grid, args, {**meta, **tiles.meta()})


@functools.cache
def _autotuned(kp: int):
    """The encoder autotuned over CANDIDATES, each fitted to a running top-kp."""
    fitted = dict.fromkeys(t.fit(kp) for t in CANDIDATES)  # in order, without repeats
    configs = [triton.Config(t.meta(), num_warps=t.warps, num_stages=t.stages) for t in fitted]
    return triton.autotune(configs=configs, key=["d", "m_per_split", "K", "KEY16", "IEEE"])(
        encode_topk_kernel
    )


def wide_keys(keys: Tensor, m_per_split: int) -> Tensor:
    """The kernel's keys (n, splits, k) as int64 keys (value << 32) | (0xFFFFFFFF - index):
    int32 keys hold the value's 16 bits over the bit-flipped index within their split."""
    if keys.dtype == torch.int64:
        return keys
    base = torch.arange(keys.shape[1], device=keys.device)[None, :, None] * m_per_split
    keys = keys.to(torch.int64)
    index = base + (_LOW16 - (keys & _LOW16))
    return torch.where(keys > 0, ((keys >> 16) << 32) | (_LOW32 - index), 0)


def merge_splits(keys: Tensor, k: int) -> Tensor:
    """(n, splits, k) int64 partial lists, each exact and sorted -> the top k keys per row."""
    n, splits, _ = keys.shape
    keys = keys.reshape(n, splits * k)
    return keys if splits == 1 else keys.topk(k, dim=1).values


def unkey(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int64 keys -> values in dtype (exact: they were rounded to it), int64 indices.

    The value field holds the value's own bits: 32 for float32, 16 for 16-bit dtypes.
    """
    bits = (keys >> 32).to(torch.int32)
    values = bits.view(torch.float32) if dtype == torch.float32 else bits.to(torch.int16)
    return values.view(dtype), _LOW32 - (keys & _LOW32)


def topk_code(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The TopK code: values (n, k) in x's dtype and int64 indices, by the fused kernel."""
    if x.shape[0] == 0:
        return x.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=x.device)
    launch = plan((x - b_dec).contiguous(), W_enc.contiguous(), b_enc.contiguous(), k)
    launch.run()
    keys = wide_keys(launch.args[3], launch.args[7])
    return unkey(merge_splits(keys, k), x.dtype)
