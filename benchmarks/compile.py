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


def replay(launch, dtype, rows: int = 64) -> dict[str, float]:
    """What the kernel's selection does per latent tile in launch (inputs of dtype), replayed
    on rows of i.i.d. N(0, 1) pre-activations over one latent split: the share of tiles that
    skip, go light or full, the mean extraction iterations of a light tile, and flushes of the
    buffer per tile."""
    import torch

    meta = launch.meta
    k, light_max, width, block_m = meta["K"], meta["LIGHT"], meta["BUF"], meta["BLOCK_M"]
    m_split = launch.args[7]  # m_per_split
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    best = torch.zeros(min(rows, meta["BLOCK_N"]), k, dtype=torch.int64)
    buf = torch.zeros(best.shape[0], 0, dtype=torch.int64)

    def flushed(best, buf):
        counts["flush"] += 1
        return torch.cat([best, buf], dim=1).topk(k, dim=1).values, buf[:, :0]

    for start in range(0, m_split, block_m):
        cols = torch.arange(start, min(start + block_m, m_split))
        acts = torch.randn(best.shape[0], cols.numel(), generator=g).relu().to(dtype)
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
            if buf.shape[1]:
                best, buf = flushed(best, buf)
            best = torch.cat([best, keys], dim=1).topk(k, dim=1).values
        elif most > 0:
            counts["light"] += 1
            counts["iterations"] += most
            if int((buf.shape[1] + count).max()) > width:
                best, buf = flushed(best, buf)
            buf = torch.cat([buf, keys.topk(most, dim=1).values], dim=1)
    tiles_seen = counts["tiles"]
    return {
        "skip": (tiles_seen - counts["light"] - counts["full"]) / tiles_seen,
        "light": counts["light"] / tiles_seen,
        "full": counts["full"] / tiles_seen,
        "iterations_per_light_tile": counts["iterations"] / max(counts["light"], 1),
        "flushes_per_tile": (counts["flush"] + 1) / tiles_seen,  # + the flush at the end
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
    flush = probes["flush"]["epilogue_static"] - always
    loop_body = probes["light"]["extraction_loop_body"]
    parts = {
        "always": always,
        "flush": flush,
        "extraction_iteration": loop_body,
        "light": probes["light"]["epilogue_static"] - always - loop_body,
        "full": probes["full"]["epilogue_static"] - always,
    }
    seen = replay(launch, preset.torch_dtype)
    expected = (
        always
        + seen["light"] * (parts["light"] + seen["iterations_per_light_tile"] * loop_body)
        + seen["full"] * parts["full"]
        + seen["flushes_per_tile"] * flush
    )
    report |= {"selection_parts": parts, "replay": seen}
    report["selection_per_tile"] = round(expected)
    report["selection_over_gemm"] = round(expected / report["gemm_per_tile"], 3)

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


def select_report(preset, ks: tuple[int, ...] = (32, 64, 128, 256)) -> dict[str, Any]:
    """Resources of the chunked encoder's select kernel at preset's dtype, for each k, on a
    chunk of the width the chunked backend would take."""
    import torch

    from sae_fast.backends.chunked import chunk_for
    from sae_fast.kernels import select_topk

    dtype = preset.torch_dtype
    chunk = chunk_for(preset.n, preset.m, dtype.itemsize)
    pre = torch.empty(preset.n, chunk, dtype=dtype)
    return {
        f"select k={k}": resources(
            select_topk.plan(pre, 0, select_topk.running(preset.n, k, pre.device), k).compile()
        )
        for k in ks
    }


# --- the run -----------------------------------------------------------------------------------


def run(names: list[str]) -> dict[str, Any]:
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
        result["presets"][name] = {
            "shape": {f: getattr(preset, f) for f in ("n", "d", "m", "k", "dtype")},
            **encoder_report(preset, plain_gemm),
            **decode_report(preset),
        }
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
        for kernel in ("gather_sum", "pair_dot"):
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .report import write_json

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks kernels", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated preset names")
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    args = ap.parse_args(argv)
    result = run(args.presets.split(","))
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
