"""Compile-level benchmark of the Triton kernels, on a machine without a GPU.

Each kernel is compiled for a Hopper GPU (sm_90, 132 multiprocessors: an H200) exactly as a
real launch at a preset would compile it: the launch plan of sae_fast.kernels, compiled by
Triton's JIT (kernel.warmup) against a stand-in driver, so pointer alignment and integer
divisibility specialise as they would on the GPU. From the binary it reports registers, spills
(ptxas -v), shared memory, pipeline stages, and the SASS instruction mix: the instructions of
the GEMM loop per latent tile against those of the tile's epilogue (bias, ReLU, keys and
selection), next to a plain Triton GEMM with the same tiles.

The encoder's selection branches per tile (no candidate, a light top-8, a full top-k), so its
epilogue is reported per path (each path's code compiled on its own), with the share of tiles
that takes each path at the preset from a replay of the kernel's decisions on i.i.d.
pre-activations (as at initialisation; a trained SAE's differ), and the expected selection
instructions per tile that follow.

    python -m benchmarks kernels [--presets gpu,gpu-large] [--out DIR]

Needs Triton with its NVIDIA backend (ptxas and cuobjdump ship with it); runs in a process of
its own with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

CAPABILITY = (9, 0)  # Hopper: H100, H200
ARCH = CAPABILITY[0] * 10 + CAPABILITY[1]
SM_COUNT = 132  # H200 SXM
DEFAULT_PRESETS = "gpu,gpu-large"
DEFAULT_OUT = "benchmarks/out"  # where every benchmark writes unless told
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# SASS opcode families, by the first dot-separated part of the opcode.
_MMA = {"HGMMA", "HMMA", "WARPGROUP", "IMMA", "WGMMA"}
_MEMORY = {
    "LDG", "LDGSTS", "LDGDEPBAR", "LDS", "LDSM", "STS", "STG", "STL", "LDL", "LDC", "ULDC",
    "UTMALDG", "UTMASTG", "UBLKCP", "SYNCS", "BAR", "DEPBAR", "MEMBAR", "ARRIVES", "LD", "ST",
}  # fmt: skip
_CONTROL = {"BRA", "EXIT", "BSSY", "BSYNC", "NOP", "WARPSYNC", "CALL", "RET", "YIELD"}


def fake_hopper_driver() -> None:
    """Make Triton compile for sm_90 here: a driver that reports a Hopper device and launches
    nothing (kernel.warmup only compiles)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    class CompileOnly(CudaDriver):
        def __init__(self) -> None:  # the real one loads libcuda
            self.utils = None

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

    driver.set_active(CompileOnly())


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    version = subprocess.run([get_ptxas(ARCH).path, "--version"], capture_output=True, text=True)
    return version.stdout.strip().splitlines()[-1]


def resources(compiled: Any) -> dict[str, int]:
    """Registers, spill bytes, stack and shared memory of a CompiledKernel (ptxas -v on its
    PTX with the ptxas Triton uses; cuobjdump for the binary's own register count)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = "sm_90a"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        log = subprocess.run(
            [get_ptxas(ARCH).path, "-v", f"--gpu-name={arch}",
             str(ptx), "-o", str(Path(tmp, "v"))],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    number = {
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
        "stack": r"(\d+) bytes stack frame",
    }
    out = {name: int(re.search(pattern, log).group(1)) for name, pattern in number.items()}
    out["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
    out["shared_bytes"] = int(compiled.metadata.shared)
    out["stages"] = int(compiled.metadata.num_stages)
    out["warps"] = int(compiled.metadata.num_warps)
    return out


def sass(compiled: Any) -> list[tuple[int, str, str]]:
    """(offset, opcode, operands) of every SASS instruction of a CompiledKernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return [(int(m[1], 16), m[3], m[4]) for m in _SASS_LINE.finditer(text)]


def family(opcode: str) -> str:
    """mma, memory, control or alu (everything else: integer, float, shuffles, selects)."""
    head = opcode.split(".")[0]
    if head in _MMA:
        return "mma"
    if head in _MEMORY:
        return "memory"
    if head in _CONTROL:
        return "control"
    return "alu"


def loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) offsets of each loop: a branch back to an earlier offset."""
    found = []
    for offset, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target[1], 16) < offset:
            found.append((int(target[1], 16), offset))
    return found


def forward_regions(code: list[tuple[int, str, str]], span: tuple[int, int]) -> list[tuple]:
    """(branch, target) offsets of the stretches inside span that a forward branch from
    inside it jumps over (code some tiles skip)."""
    regions = []
    for offset, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and span[0] <= offset < int(target[1], 16):
            regions.append((offset, int(target[1], 16)))
    return regions


def skipped(code: list[tuple[int, str, str]], span: tuple[int, int]) -> tuple[int, int] | None:
    """The longest stretch inside span that a forward branch jumps over (a tile's merge that
    most tiles skip), or None."""
    return max(forward_regions(code, span), key=lambda r: r[1] - r[0], default=None)


def _between(code: list[tuple[int, str, str]], region: tuple[int, int]) -> int:
    """Instructions strictly inside region (the branch itself runs on every path)."""
    return sum(region[0] < offset < region[1] for offset, _, _ in code)


def shipped_parts(code: list, inner: tuple[int, int], tile: tuple[int, int]) -> dict[str, int]:
    """The fused encoder's selection, path by path, read from the binary that runs: in its
    tile loop, the two outermost branched stretches in source order are the full tile's merge
    and the light tile's buffering; the largest stretch nested in each (ending elsewhere) is
    its buffer flush, the loop in the light one an extraction iteration, and the rest of the
    tile loop outside the GEMM loop runs on every tile."""
    regions = [r for r in forward_regions(code, tile) if not r[0] <= inner[0] < r[1]]
    top = sorted(r for r in regions if not any(o[0] <= r[0] and r[1] <= o[1] and o != r
                                               for o in regions))  # fmt: skip
    full, light = top[:2]

    def flush_in(region):
        nested = [r for r in regions if region[0] < r[0] and r[1] < region[1]]
        return max(nested, key=lambda r: r[1] - r[0])

    flush_full, flush_light = flush_in(full), flush_in(light)
    (extraction,) = [s for s in loops(code) if light[0] < s[0] and s[1] < light[1]]
    extraction_body = len(body(code, extraction))
    tile_body = len(body(code, tile)) - len(body(code, inner))
    return {
        "always": tile_body - _between(code, full) - _between(code, light),
        "flush": max(_between(code, flush_full), _between(code, flush_light)),
        "extraction_iteration": extraction_body,
        "light": _between(code, light) - _between(code, flush_light) - extraction_body,
        "full": _between(code, full) - _between(code, flush_full),
    }


def body(code: list[tuple[int, str, str]], span: tuple[int, int]) -> list[str]:
    return [op for offset, op, _ in code if span[0] <= offset <= span[1]]


def gemm_and_tile_loops(
    code: list, spans: list[tuple[int, int]]
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Of the loops spans of code: the GEMM loop (of the innermost loops, the one with the
    most MMA or FFMA work) and the smallest loop around it (the latent-tile loop)."""

    def inside(a, b):
        return b[0] <= a[0] and a[1] <= b[1] and a != b

    def work(span):
        ops = body(code, span)
        return 64 * sum(family(op) == "mma" for op in ops) + sum(
            op.startswith("FFMA") for op in ops
        )

    innermost = [s for s in spans if not any(inside(t, s) for t in spans)]
    inner = max(innermost, key=work)
    around = [s for s in spans if inside(inner, s)]
    return inner, (min(around, key=lambda s: s[1] - s[0]) if around else None)


def mix(ops: list[str]) -> dict[str, int]:
    counts = Counter(family(op) for op in ops)
    return {name: counts.get(name, 0) for name in ("mma", "memory", "alu", "control")}


def loop_profile(compiled: Any, d: int, block_d: int) -> dict[str, Any]:
    """Instructions of the GEMM loop per tile (its body times the d iterations), and of the
    tile loop outside it (static: every path of the epilogue counted once)."""
    code = sass(compiled)
    spans = loops(code)
    inner, tile = gemm_and_tile_loops(code, spans)
    gemm = body(code, inner)
    iterations = -(-d // block_d)
    out = {"gemm_loop_body": len(gemm), "gemm_per_tile": len(gemm) * iterations}
    out["gemm_mix_per_tile"] = {k: v * iterations for k, v in mix(gemm).items()}
    if tile is not None:
        outside = [
            op
            for offset, op, _ in code
            if tile[0] <= offset <= tile[1] and not inner[0] <= offset <= inner[1]
        ]
        out["epilogue_static"] = len(outside)
        out["epilogue_mix"] = mix(outside)
        nested = [s for s in spans if tile[0] <= s[0] and s[1] <= tile[1] and s != tile]
        nested = [s for s in nested if s != inner and not (s[0] <= inner[0] <= s[1])]
        out["extraction_loop_body"] = sum(len(body(code, s)) for s in nested)
    return out


# --- what is compiled ------------------------------------------------------------------------


def _kernels():
    """The benchmark's own kernels, defined once triton is imported with its JIT."""
    import triton
    import triton.language as tl

    @triton.jit
    def plain_gemm(
        X, W, OUT, n, d, m, stride_xn, stride_wm, stride_on,
        IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # The encoder's GEMM with the same tiles: a program's rows against every latent tile.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
        for tile in range(0, m, BLOCK_M):
            cols = tile + tl.arange(0, BLOCK_M)
            w_rows = W + cols.to(tl.int64)[:, None] * stride_wm
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                x = tl.load(x_rows + ds[None, :], mask=(rows[:, None] < n) & (ds[None, :] < d))
                w = tl.load(w_rows + ds[None, :], mask=(cols[:, None] < m) & (ds[None, :] < d))
                if IEEE:
                    acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
            out = OUT + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
            tl.store(out, acc, mask=(rows[:, None] < n) & (cols[None, :] < m))

    return plain_gemm


# Latent orders the replay tries: i.i.d. pre-activations (as at initialisation), magnitudes
# rising with the latent index (each tile beats the last), falling with it (a Matryoshka
# SAE's early latents are its strongest), and a dead first quarter (never positive).
ORDERS = ("iid", "rising", "falling", "dead_prefix")


def _replay_acts(order: str, rows: int, cols, m_split: int, g):
    import torch

    pre = torch.randn(rows, cols.numel(), generator=g)
    at = cols.float() / m_split
    if order == "rising":
        pre *= 0.25 + 1.5 * at
    elif order == "falling":
        pre *= 1.75 - 1.5 * at
    elif order == "dead_prefix":
        pre = torch.where(at < 0.25, -1.0, pre)
    return pre.relu()


def replay(launch, dtype, rows: int = 64, order: str = "iid") -> dict[str, float]:
    """What the kernel's selection does per latent tile in launch (inputs of dtype), replayed
    on rows of pre-activations in the given latent order (ORDERS) over one latent split: the
    share of tiles that skip, go light or full, the mean extraction iterations of a light
    tile, and flushes of the buffer per tile. As in the kernel, each row's buffer fills by its
    own candidates, and the block flushes when one row's would overflow."""
    import torch

    meta = launch.meta
    k, light_max, width, block_m = meta["K"], meta["LIGHT"], meta["BUF"], meta["BLOCK_M"]
    m_split = launch.args[7]  # m_per_split
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    best = torch.zeros(min(rows, meta["BLOCK_N"]), k, dtype=torch.int64)
    buf = torch.zeros(best.shape[0], 0, dtype=torch.int64)
    fill = torch.zeros(best.shape[0], dtype=torch.int64)

    def flushed(best, buf):
        counts["flush"] += 1
        fill.zero_()
        return torch.cat([best, buf], dim=1).topk(k, dim=1).values, buf[:, :0]

    for start in range(0, m_split, block_m):
        cols = torch.arange(start, min(start + block_m, m_split))
        acts = _replay_acts(order, best.shape[0], cols, m_split, g).to(dtype)
        if dtype == torch.float32:
            bits = acts.view(torch.int32).to(torch.int64)
        else:
            bits = acts.view(torch.int16).to(torch.int64) & 0x7FFF
        keys = (bits << 32) | (0xFFFFFFFF - cols)
        beats = keys > best[:, k - 1 : k]
        count = beats.sum(dim=1)
        most = int(count.max())
        keys = torch.where(beats, keys, 0)
        counts["tiles"] += 1
        if most > light_max:
            counts["full"] += 1
            if int(fill.max()) > 0:
                best, buf = flushed(best, buf)
            best = torch.cat([best, keys], dim=1).topk(k, dim=1).values
        elif most > 0:
            counts["light"] += 1
            counts["iterations"] += most
            if int((fill + count).max()) > width:
                best, buf = flushed(best, buf)
            buf = torch.cat([buf, keys.topk(most, dim=1).values], dim=1)  # zeros pad rows
            fill += count
    tiles_seen = counts["tiles"]
    return {
        "skip": (tiles_seen - counts["light"] - counts["full"]) / tiles_seen,
        "light": counts["light"] / tiles_seen,
        "full": counts["full"] / tiles_seen,
        "iterations_per_light_tile": counts["iterations"] / max(counts["light"], 1),
        # + the flush at the end, if a row holds candidates
        "flushes_per_tile": (counts["flush"] + int(fill.max() > 0)) / tiles_seen,
    }


def encoder_launch(preset):
    """The encoder's launch at preset on the target, and its pinned tiles (as pinned)."""
    import torch

    from sae_fast.kernels import encode_topk

    dtype = preset.torch_dtype
    xc = torch.empty(preset.n, preset.d, dtype=dtype)
    W = torch.empty(preset.m, preset.d, dtype=dtype)
    b_enc = torch.empty(preset.m, dtype=dtype)
    tiles = encode_topk.pinned(CAPABILITY, dtype)
    return encode_topk.plan(xc, W, b_enc, preset.k, tiles=tiles, sm_count=SM_COUNT), tiles


def encoder_report(preset, plain_gemm) -> dict[str, Any]:
    """Resources and instruction mix of the encoder at preset, next to the plain GEMM."""
    import torch
    import triton

    from sae_fast.kernels.launch import Launch

    launch, tiles = encoder_launch(preset)
    xc, W = launch.args[:2]
    tiles = tiles.fit(launch.meta["KP"])
    started = time.perf_counter()
    compiled = launch.compile()
    seconds = time.perf_counter() - started
    report = {
        "tiles": tiles.__dict__,
        "grid": list(launch.grid),
        "compile_seconds": round(seconds, 1),
        **resources(compiled),
        **loop_profile(compiled, preset.d, tiles.block_d),
    }
    # Each part of the selection alone: the kernel compiled with PROBE set, its tile epilogue.
    probes = {}
    for part, probe in (("skip", 1), ("light", 2), ("full", 3), ("flush", 4)):
        variant = Launch(launch.kernel, launch.grid, launch.args, launch.meta | {"PROBE": probe})
        probes[part] = loop_profile(variant.compile(), preset.d, tiles.block_d)
    always = probes["skip"]["epilogue_static"]
    probe_loop = probes["light"]["extraction_loop_body"]
    probe_parts = {
        "always": always,
        "flush": probes["flush"]["epilogue_static"] - always,
        "extraction_iteration": probe_loop,
        "light": probes["light"]["epilogue_static"] - always - probe_loop,
        "full": probes["full"]["epilogue_static"] - always,
    }
    # The expectation counts the binary that runs; the PROBE variants stay beside it.
    code = sass(compiled)
    parts = shipped_parts(code, *gemm_and_tile_loops(code, loops(code)))
    always, flush, loop_body = parts["always"], parts["flush"], parts["extraction_iteration"]

    def expected(seen: dict[str, float]) -> float:
        """Selection instructions per tile: each path's cost weighted by its share."""
        return (
            always
            + seen["light"] * (parts["light"] + seen["iterations_per_light_tile"] * loop_body)
            + seen["full"] * parts["full"]
            + seen["flushes_per_tile"] * flush
        )

    orders = {order: replay(launch, preset.torch_dtype, order=order) for order in ORDERS}
    seen = orders["iid"]
    for replayed in orders.values():
        replayed["selection_over_gemm"] = round(expected(replayed) / report["gemm_per_tile"], 3)
    report |= {"selection_parts": parts, "probe_parts": probe_parts, "replay": seen,
               "replay_orders": orders}  # fmt: skip
    report["selection_per_tile"] = round(expected(seen))
    report["selection_over_gemm"] = seen["selection_over_gemm"]

    out = torch.empty(16, dtype=torch.float32)  # compiled, never written: only its address counts
    gemm = plain_gemm.warmup(
        xc, W, out, preset.n, preset.d, preset.m, xc.stride(0), W.stride(0), preset.m,
        IEEE=launch.meta["IEEE"], BLOCK_N=tiles.block_n, BLOCK_M=tiles.block_m,
        BLOCK_D=tiles.block_d, num_warps=tiles.warps, num_stages=tiles.stages,
        grid=(triton.cdiv(preset.n, tiles.block_n),),
    )  # fmt: skip
    gemm_report = {**resources(gemm), **loop_profile(gemm, preset.d, tiles.block_d)}
    gemm_report.pop("epilogue_mix", None)
    return {"encoder": report, "plain_gemm": gemm_report}


def decode_report(preset) -> dict[str, Any]:
    """Resources of the decoder's gather_sum and pair_dot at preset."""
    import torch

    from sae_fast.kernels import decode

    dtype = preset.torch_dtype
    W = torch.empty(preset.m, preset.d, dtype=dtype)
    rows = torch.empty(preset.n, preset.d, dtype=dtype)
    values = torch.empty(preset.n, preset.k, dtype=dtype)
    indices = torch.empty(preset.n, preset.k, dtype=torch.int64)
    bias = torch.empty(preset.d, dtype=dtype)
    plans = {
        "gather_sum": decode.plan(decode.gather_sum_kernel, rows, False, W, values, indices, bias),
        "pair_dot": decode.plan(decode.pair_dot_kernel, values.float(), True, W, rows, indices),
    }
    return {name: resources(launch.compile()) for name, launch in plans.items()}


def select_paths(preset) -> dict[str, Any]:
    """The chunked select's tile loop at preset, read from its binary: the instructions a
    tile that no row gains from runs (the loop without the merge it branches over), those of
    the merge, and the skip path's warp instructions per pre-activation (what the roofline's
    select time counts)."""
    launch = select_launch(preset, preset.k)
    code = sass(launch.compile())
    (tile,) = loops(code)  # the one loop: over the chunk's tiles
    merge = skipped(code, tile)
    merged = _between(code, merge) if merge is not None else 0
    skip = len(body(code, tile)) - merged
    meta = launch.meta
    elements = meta["BLOCK_N"] * meta["BLOCK_M"]
    return {
        "skip_path_per_tile": skip,
        "merge_per_tile": merged,
        "warp_instructions_per_element": round(skip * meta["num_warps"] / elements, 4),
    }


def select_launch(preset, k: int):
    """The chunked encoder's select launch at preset's dtype for k, on a chunk of the width
    the chunked backend would take."""
    import torch

    from sae_fast.backends.chunked import chunk_for
    from sae_fast.kernels import select_topk

    dtype = preset.torch_dtype
    pre = torch.empty(preset.n, chunk_for(preset.n, preset.m, dtype.itemsize), dtype=dtype)
    return select_topk.plan(pre, 0, select_topk.running(preset.n, k, pre.device), k)


def select_report(preset, ks: tuple[int, ...] = (32, 64, 128, 256)) -> dict[str, Any]:
    """Resources of the chunked encoder's select kernel at preset's dtype, for each k."""
    return {f"select k={k}": resources(select_launch(preset, k).compile()) for k in ks}


REGISTERS_PER_SM, SHARED_PER_SM = 65536, 228 * 1024  # sm_90


def blocks_per_sm(report: dict[str, int]) -> int:
    """Blocks of a kernel one SM holds at once, by registers (allocated 8 per thread at a
    time) and shared memory."""
    threads = 32 * report["warps"]
    by_registers = REGISTERS_PER_SM // (-(-report["registers"] // 8) * 8 * threads)
    by_shared = SHARED_PER_SM // max(report["shared_bytes"], 1)
    return min(by_registers, by_shared)


def encoder_sweep(
    preset, dtypes=("bf16", "fp16", "fp32"), ks=(32, 64, 128, 256), widths=()
) -> dict[str, Any]:
    """The fused encoder and the chunked select at preset for each dtype and k (and each
    (dtype, d) of widths, at the preset's k): resources, blocks per SM, whether the fused
    kernel's GEMM is on wgmma and loads with cp.async, and where the triton backend routes
    the shape away from it (kernels/encode_topk.cliff)."""
    from dataclasses import replace

    from sae_fast.kernels.encode_topk import cliff

    cases = [replace(preset, dtype=t, k=k) for t in dtypes for k in ks]
    cases += [replace(preset, dtype=t, d=d) for t, d in widths]
    out = {}
    for case in cases:
        launch, _ = encoder_launch(case)
        compiled = launch.compile()
        opcodes = {op.split(".")[0] for _, op, _ in sass(compiled)}
        fused = resources(compiled)
        fused |= {"blocks_per_sm": blocks_per_sm(fused), "wgmma": "HGMMA" in opcodes,
                  "cp_async": "LDGSTS" in opcodes}  # fmt: skip
        (select,) = select_report(case, (case.k,)).values()
        select["blocks_per_sm"] = blocks_per_sm(select)
        why = cliff(CAPABILITY, case.torch_dtype, case.d, case.k)
        name = f"{case.dtype} d={case.d} k={case.k}"
        out[name] = {"fused": fused, "select": select, "routed_to_chunked": why}
    return out


def optimizer_report(preset) -> dict[str, Any]:
    """Resources of the fused optimizer pass (kernels/adam_rows.py) over the preset's fp32
    W_dec (projection and renormalisation), with fp32 and with bf16 moments."""
    import torch

    from sae_fast.kernels import adam_rows

    p = torch.empty(preset.m, preset.d, dtype=torch.float32)
    hyper = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step": 1}
    return {
        f"adam_rows {name}": resources(
            adam_rows.plan(
                p, torch.empty_like(p), *(torch.empty_like(p, dtype=moments) for _ in range(2)),
                project=True, renormalise=True, **hyper,
            ).compile()
        )
        for name, moments in (("fp32 moments", torch.float32), ("bf16 moments", torch.bfloat16))
    }  # fmt: skip


def time_model(preset, selection_over_gemm: float, select_instructions: float) -> dict[str, Any]:
    """The roofline (sae_fast/training/roofline.py) of the two encoders at preset on an H100
    and an H200: bytes from HBM and L2, predicted ms and predicted_x_cublas, (low, high),
    with the fused kernel's selection share and the select's instructions per element read
    from their binaries."""
    from sae_fast.training import roofline

    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[preset.dtype]
    shape = roofline.Shape(n=preset.n, d=preset.d, m=preset.m, k=preset.k, dtype=dtype)
    out: dict[str, Any] = {"bytes": roofline.encoder_traffic(shape)}
    for name, gpu in roofline.GPUS.items():
        t = roofline.step_time(
            gpu, shape, fused_selection=selection_over_gemm,
            select_instructions=select_instructions,
        )  # fmt: skip
        out[name] = {
            "ms": {p: [round(s * 1e3, 3) for s in t[p]] for p in ("gemm", "fused", "chunked")},
            "predicted_x_cublas": {
                p: [round(t[p][i] / t["gemm"][i], 3) for i in (0, 1)] for p in ("fused", "chunked")
            },
        }
    return out


# --- the run -----------------------------------------------------------------------------------


def run(names: list[str], sweep: bool = True) -> dict[str, Any]:
    import torch
    import triton

    from . import presets
    from .report import environment

    fake_hopper_driver()
    plain_gemm = _kernels()
    result = {
        "target": {"capability": list(CAPABILITY), "sm_count": SM_COUNT, "arch": "sm_90a"},
        "env": {
            **environment("cpu"),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "ptxas": _ptxas_version(),
        },
        "presets": {},
    }
    for name in names:
        preset = presets.PRESETS[name]
        print(f"compiling at preset {name} ...", file=sys.stderr, flush=True)
        report = {
            "shape": {f: getattr(preset, f) for f in ("n", "d", "m", "k", "dtype")},
            **encoder_report(preset, plain_gemm),
            **decode_report(preset),
            **optimizer_report(preset),
            "sweep": encoder_sweep(preset, widths=(("bf16", preset.d - 4),)) if sweep else {},
        }
        report["select_paths"] = select_paths(preset)
        report["time_model"] = time_model(
            preset,
            report["encoder"]["selection_over_gemm"],
            report["select_paths"]["warp_instructions_per_element"],
        )
        result["presets"][name] = report
    return result


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"Compiled for sm_90a (H200: {result['target']['sm_count']} SMs) with Triton "
        f"{env['triton']} ({env['ptxas']}), torch {env['torch']}, commit {env['commit']}"
        f"{' (with uncommitted changes)' if env['uncommitted_changes'] else ''}; no GPU ran.",
        "",
        "| preset | kernel | tiles (n, m, d) / warps / stages | registers | spills (B) "
        "| shared (B) | GEMM loop / tile | selection / tile | selection / GEMM | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["presets"].items():
        enc, gemm = r["encoder"], r["plain_gemm"]
        t = enc["tiles"]
        tiles = f"{t['block_n']}x{t['block_m']}x{t['block_d']} / {t['warps']} / {t['stages']}"
        seen, parts = enc["replay"], enc["selection_parts"]
        lines.append(
            f"| {name} | encoder | {tiles} | {enc['registers']} | {enc['spill_stores']} "
            f"| {enc['shared_bytes']} | {enc['gemm_per_tile']} | {enc['selection_per_tile']} "
            f"| {enc['selection_over_gemm']} | {enc['compile_seconds']} |"
        )
        lines.append(
            f"| {name} | plain GEMM, same tiles | {tiles} | {gemm['registers']} "
            f"| {gemm['spill_stores']} | {gemm['shared_bytes']} | {gemm['gemm_per_tile']} | | | |"
        )
        for kernel in (
            "gather_sum",
            "pair_dot",
            "adam_rows fp32 moments",
            "adam_rows bf16 moments",
        ):
            k = r[kernel]
            lines.append(
                f"| {name} | {kernel} | {k['warps']} warps | {k['registers']} "
                f"| {k['spill_stores']} | {k['shared_bytes']} | | | | |"
            )
        iterations = seen["iterations_per_light_tile"]
        lines.append(
            f"| {name} | encoder selection, per tile: always {parts['always']}; light "
            f"{seen['light']:.0%} of tiles, {parts['light']} + {iterations:.1f} x "
            f"{parts['extraction_iteration']}; full {seen['full']:.0%}, {parts['full']}; "
            f"{seen['flushes_per_tile']:.2f} flushes of {parts['flush']} | | | | | | | | |"
        )
    for name, r in result["presets"].items():
        lines += _sweep_lines(name, r["sweep"]) if r["sweep"] else []
        lines += _order_lines(name, r["encoder"])
        lines += _time_lines(name, r["time_model"])
    return "\n".join(lines)


def _table(caption: str, columns: list[str], left: int, rows: list[list]) -> list[str]:
    """A markdown table after a blank line, its caption and another: the first `left`
    columns aligned left, the others right."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    return [
        "", caption, "", "| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]  # fmt: skip


def _sweep_lines(preset: str, sweep: dict[str, Any]) -> list[str]:
    def usage(r: dict) -> str:
        return f"{r['registers']} / {r['spill_stores']} / {r['blocks_per_sm']}"

    rows = [
        [case, usage(r["fused"]), "yes" if r["fused"]["wgmma"] else "no",
         "yes" if r["fused"]["cp_async"] else "no", usage(r["select"]),
         r["routed_to_chunked"] or ""]
        for case, r in sweep.items()
    ]  # fmt: skip
    return _table(
        f"Preset {preset}, per dtype, width and k: the fused encoder and the chunked select "
        "(registers / spill bytes / blocks per SM) and where the triton backend routes a shape "
        "to the chunked encoder.",
        ["shape", "fused", "wgmma", "cp.async", "select", "routed to chunked"], 6, rows,
    )  # fmt: skip


def _order_lines(preset: str, encoder: dict[str, Any]) -> list[str]:
    rows = [
        [order, f"{r['skip']:.0%}", f"{r['light']:.0%}", f"{r['full']:.0%}",
         f"{r['flushes_per_tile']:.3f}", r["selection_over_gemm"]]
        for order, r in encoder["replay_orders"].items()
    ]  # fmt: skip
    return _table(
        f"Preset {preset}: the fused kernel's selection replayed on latent orders "
        "(per row buffers, as the kernel fills them).",
        ["order", "skip", "light", "full", "flushes / tile", "selection / GEMM"], 1, rows,
    )  # fmt: skip


def _time_lines(preset: str, model: dict[str, Any]) -> list[str]:
    rows = []
    for gpu in ("h100", "h200"):
        for path in ("gemm", "fused", "chunked"):
            traffic, ms = model["bytes"][path], model[gpu]["ms"][path]
            ratio = model[gpu]["predicted_x_cublas"].get(path, [1.0, 1.0])
            rows.append(
                [gpu, path, f"{traffic['hbm'] / 1e9:.2f}", f"{traffic['l2'] / 1e9:.1f}",
                 f"{ms[0]:.2f}-{ms[1]:.2f}", f"{ratio[0]:.2f}-{ratio[1]:.2f}"]
            )  # fmt: skip
    return _table(
        f"Preset {preset}: the roofline of the two encoders (a prediction; "
        "sae_fast/training/roofline.py states the assumptions).",
        ["GPU", "path", "HBM GB", "L2 GB", "ms (low-high)", "predicted_x_cublas"], 2, rows,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .report import write_json

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks kernels", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated preset names")
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    ap.add_argument(
        "--no-sweep", action="store_true",
        help="skip the dtype x k sweep of the encoders (26 more compiles per preset)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    result = run(args.presets.split(","), sweep=not args.no_sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-sm90-triton{result['env']['triton']}-{time.strftime('%Y%m%d')}"
    write_json(args.out / f"{stem}.json", result)
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    raise SystemExit(main())
