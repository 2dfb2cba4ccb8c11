"""A cross-layer transcoder's training step: the sparse path against the dense one.

`python -m benchmarks clt` runs one training step of a TopK CLT (L layers, m features per
layer, k per token and layer, n tokens) two ways, on the same weights and batch:

- sparse: sae_fast's CrossLayerTranscoder. Each layer's code comes from ops.encode_topk,
  which never makes the (n, m) matrix. The decode is one sparse gather-sum per source layer,
  and both have sparse backwards.
- dense: the way llamascopium and crosslayer-coding compute a CLT. Each layer's dense (n, m)
  pre-activations are formed, torch.topk keeps k of them, the kept values are scattered into
  a dense (L, n, m) code, and a dense decode runs per target layer (sum over sources
  s <= t of z[s] @ W_dec[s][:, t - s]).

The step is the forward, the loss (the sum over layers of the per-layer MSE), the backward
and torch's Adam. Both ways' outputs are checked equal first, and a way that differs is not
timed. Each step is timed in alternation with the floor, the L dense encoder GEMMs
(benchmarks.measure.paired_ms), and reported as a ratio to it. Peak memory is the extra RSS
of a steady-state step, each way in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

from sae_fast import reference
from sae_fast.clt import CrossLayerTranscoder

from . import report
from .measure import paired_ms, peak_extra_mib

WAYS = ("sparse", "dense")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6, help="layers L (default: 6)")
    parser.add_argument("--d", type=int, default=384, help="activation width (default: 384)")
    parser.add_argument("--m", type=int, default=4096, help="features per layer (default: 4096)")
    parser.add_argument("--k", type=int, default=32, help="active features per token and layer")
    parser.add_argument("--n", type=int, default=1024, help="tokens per step (default: 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after a warm-up")


def _shape(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("layers", "d", "m", "k", "n")}


def _inputs(shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["layers"], shape["n"], shape["d"], generator=g)
    return x, torch.randn(x.shape, generator=g)


def dense_outputs(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """The dense way (module docstring): (L, n, d) from x (L, n, d)."""
    pre = clt.pre_activations(x)  # (L, n, m)
    values, indices = pre.relu().topk(clt.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    return reference.clt_decode(z, list(clt.W_dec), clt.b_dec)


def _step_fn(way: str, shape: dict):
    """(clt, step): a CLT of shape's sizes (seeded: both ways get the same weights) and one
    training step of it the given way on the benchmark's batch."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(shape["layers"], shape["d"], shape["m"], k=shape["k"])
    with torch.no_grad():
        clt.b_enc.uniform_(-0.1, 0.1)
    x, y = _inputs(shape)
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-4)

    def outputs() -> torch.Tensor:
        return clt(x).y_hat if way == "sparse" else dense_outputs(clt, x)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = (outputs() - y).pow(2).mean(dim=(1, 2)).sum()
        loss.backward()
        optimizer.step()
        return loss.item()

    return clt, outputs, step


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    """Equality, then time against the floor and the peak memory of each way."""
    shape = _shape(args)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    x, _ = _inputs(shape)
    built = {way: _step_fn(way, shape) for way in WAYS}
    with torch.no_grad():
        sparse, dense = (built[way][1]() for way in WAYS)
    error = (sparse - dense).abs().max().item()
    equal = error <= 1e-4 * max(dense.abs().max().item(), 1.0)
    W_enc = built["sparse"][0].W_enc.detach().transpose(1, 2).contiguous()

    def gemm():
        return torch.bmm(x, W_enc)

    records = []
    for way in WAYS:
        if not equal:
            records.append({"way": way, "status": "differs", "max_error": error})
            continue
        progress(f"timing {way}")
        ms, floor_ms, ratio = paired_ms(built[way][2], gemm, "cpu", args.repeats)
        progress(f"memory {way}")
        peak = _memory(way, shape)
        records.append(
            {"way": way, "status": "ok", "ms": ms, "gemm_ms": floor_ms, "x_gemm": ratio,
             "peak_mib": peak}
        )  # fmt: skip
    return {
        "benchmark": "clt",
        "shape": shape,
        "repeats": args.repeats,
        "max_error": error,
        "env": report.environment("cpu"),
        "records": records,
    }


def _memory(way: str, shape: dict) -> float:
    """The peak extra RSS (MiB) of a steady-state step, in a process of its own."""
    spec = json.dumps({"way": way, "shape": shape, "threads": torch.get_num_threads()})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers leave the RSS
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "_clt_child", spec],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the {way} memory child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: dict) -> float:
    """In a fresh process: one warm-up step, then the peak extra MiB of the next."""
    torch.set_num_threads(spec["threads"])
    _, _, step = _step_fn(spec["way"], spec["shape"])
    step()
    return peak_extra_mib(step, "cpu")


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"# A TopK CLT's training step: L={s['layers']}, d={s['d']}, m={s['m']} per layer, "
        f"k={s['k']}, n={s['n']} tokens",
        "",
        f"CPU float32, forward + per-layer MSE + backward + Adam; median of {result['repeats']} "
        f"steps. Outputs of the two ways agree to {result['max_error']:.2g}.",
        "",
        "| way | ms | x GEMM | GEMM ms | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['way']} | {r['status']} | | | |")
            continue
        lines.append(
            f"| {r['way']} | {r['ms']:.0f} | {r['x_gemm']:.2f} | {r['gemm_ms']:.0f} | "
            f"{r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)
