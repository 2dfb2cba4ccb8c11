"""The checks a lent GPU runs in one call (benchmarks/gpu_check.sh is the one command).

Steps, each timed and reported with its status, so one failing step does not hide the others:
- exact: the fused encoder (the triton backend held to it), the chunked encoder and the cuda
  backend (whichever encoder it picks) at the `gpu` preset against an exact canonical top-k
  on sampled rows (float64 pre-activations of the same bf16 inputs, rounded to bf16 as the
  kernel rounds);
- encoders: the fused and the chunked encoder timed at the `gpu` preset, with the cuBLAS
  GEMM alone and the GEMM + torch.topk on the same inputs, and the pick the triton backend
  makes by its own measurement (backends/encoders.py, in a fresh cache);
- optimizer: the fused optimizer pass (projection, Adam, renormalisation: kernels/adam_rows.py)
  against the three passes it replaces, on the `gpu` preset's fp32 SAE: one step of each
  must agree, then both are timed;
- every timed step prints the roofline's prediction (training/roofline.py) beside it;
- offsets: m * d past 2^31 (d=4096, m=655360: W is 5 GiB), with latents planted beyond the
  int32 range that must win, against the torch backend;
- bench: encode, decode, forward + backward and a train step per backend and the peers
  installed, against the cuBLAS GEMM, in one run of the benchmark suite (ops, train_step);
- the GPU tests (`pytest -m gpu`) run from the shell script, beside this.
Writes gpu_check.json and gpu_check.md (and the benchmark's json, md and png) into --out.

--dry runs the same steps on tiny shapes on the CPU, the Triton kernels under the interpreter:
the test suite runs it, so the logic is checked without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .presets import PRESETS
from .report import environment, write_json

_GPU = PRESETS["gpu"]
# Shapes per mode: the real ones, and the dry run's (the interpreter is ~1000x slower).
# exact: (n, d, m, k, rows sampled), at the gpu preset on the GPU; encoders: (n, d, m, k).
SHAPES = {
    False: {"exact": (_GPU.n, _GPU.d, _GPU.m, _GPU.k, 256), "offsets": (64, 4096, 655360, 32),
            "encoders": (_GPU.n, _GPU.d, _GPU.m, _GPU.k)},
    True: {"exact": (48, 32, 256, 8, 16), "offsets": (8, 16, 300, 4),
           "encoders": (8, 16, 96, 4)},
}  # fmt: skip


def _dtype(dry: bool):
    """The checks' input dtype: bf16 on the GPU; fp32 dry, as the interpreter mishandles bf16."""
    import torch

    return torch.float32 if dry else torch.bfloat16


def _inputs(n: int, d: int, m: int, device: str, dtype, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(m, d, generator=g) / d**0.5
    tensors = (torch.randn(n, d, generator=g), W, 0.01 * torch.randn(m, generator=g))
    tensors += (0.1 * torch.randn(d, generator=g),)
    return [t.to(device, dtype) for t in tensors]


def exact_topk(x, W_enc, b_enc, b_dec, k: int, chunk: int = 8192):
    """The canonical top-k of relu(pre) rounded to x's dtype, pre exact in float64 from the
    kernel's own inputs (x - b_dec as x's dtype forms it), over latent chunks."""
    import torch

    xc = (x - b_dec).double()
    best_v = best_i = None
    for start in range(0, W_enc.shape[0], chunk):
        pre = xc @ W_enc[start : start + chunk].double().T + b_enc[start : start + chunk].double()
        values = torch.relu(pre).to(x.dtype).double()
        index = torch.arange(start, start + values.shape[1], device=x.device).expand_as(values)
        if best_v is not None:
            values, index = torch.cat([best_v, values], 1), torch.cat([best_i, index], 1)
        values, order = values.sort(dim=1, descending=True, stable=True)
        best_v, best_i = values[:, :k], index.gather(1, order[:, :k])
    return best_v, best_i


def check_exact(dry: bool, device: str) -> dict[str, Any]:
    import torch

    from sae_fast import ops

    n, d, m, k, sampled = SHAPES[dry]["exact"]
    dtype = _dtype(dry)
    x, W, b_enc, b_dec = _inputs(n, d, m, device, dtype)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:sampled].to(device)
    want_values, want = exact_topk(x[rows], W, b_enc, b_dec, k)
    out = {"shape": {"n": n, "d": d, "m": m, "k": k, "dtype": str(dtype), "rows": sampled}}

    def check(name: str) -> dict[str, Any]:
        code = ops.encode_topk(x, W, b_enc, b_dec, k, backend=name)
        got, values = code.indices[rows], code.values[rows].double()
        same = (got == want).all(dim=1)
        # A value may differ by fp32 accumulation: across one bf16 rounding step at most.
        ulp = want_values.abs() * (2**-7 if dtype == torch.bfloat16 else 2**-18)
        close = ((values - want_values).abs() <= ulp).all(dim=1)
        return {
            "status": "ok" if bool(close.all()) and same.float().mean() >= 0.99 else "failed",
            "rows_identical": float(same.float().mean()),
            "rows_within_one_rounding_step": float(close.float().mean()),
        }

    return out | _per_gpu_backend(x, check)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """os.environ[name] = value (unset for None) inside the block, as it was after."""
    old = os.environ.get(name)

    def put(text: str | None) -> None:
        if text is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = text

    put(value)
    try:
        yield
    finally:
        put(old)


def _per_gpu_backend(x, check) -> dict[str, Any]:
    """check(name) for the GPU backends where they run on x (else why not): triton held to
    the fused encoder, chunked, and cuda with the encoder it picks; a status of the whole:
    failed if one failed."""
    from sae_fast import backends
    from sae_fast.backends import encoders

    out = {}
    for name, encoder in (("triton", "fused"), ("chunked", None), ("cuda", None)):
        reason = backends.get(name).why_not(x)
        with _env(encoders.ENV_VAR, encoder):
            out[name] = check(name) if reason is None else {"status": "skipped", "reason": reason}
    failed = any(r["status"] == "failed" for r in out.values())
    return {"status": "failed" if failed else "ok", **out}


def _cpu_seconds(run) -> float:
    """Seconds of one run() after an untimed one (the dry run's stand-in for gpu_seconds)."""
    run()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def check_encoders(dry: bool, device: str) -> dict[str, Any]:
    """Both exact encoders, the GEMM alone and the GEMM + torch.topk, timed on the same
    inputs, as ratios to the GEMM; and the encoder the triton backend picks for them."""
    import torch

    from sae_fast.backends import chunked, encoders
    from sae_fast.kernels import encode_topk

    n, d, m, k = SHAPES[dry]["encoders"]
    x, W, b_enc, b_dec = _inputs(n, d, m, device, _dtype(dry))
    seconds = _cpu_seconds if dry else encoders.gpu_seconds
    paths = {
        "fused": lambda: encode_topk.topk_code(x, W, b_enc, b_dec, k),
        "chunked": lambda: chunked.topk_code(x, W, b_enc, b_dec, k, None),
    }
    timed = {
        "gemm": lambda: torch.addmm(b_enc, x - b_dec, W.T),
        "gemm_topk": lambda: torch.addmm(b_enc, x - b_dec, W.T).relu_().topk(k, dim=1),
        **paths,
    }
    ms = {name: seconds(run) * 1e3 for name, run in timed.items()}
    with tempfile.TemporaryDirectory() as cache, _env(encoders.CACHE_ENV, cache):
        encoders.forget()  # the exact step's cuda backend may have chosen for this shape
        with _env(encoders.ENV_VAR, None):
            pick = encoders.choose(encoders.key(x, W, k), paths, seconds)
    from sae_fast.training import roofline

    roof = _roofline_ms(dry, roofline.Shape(n=n, d=d, m=m, k=k, dtype="bfloat16"))
    return {
        "status": "ok",
        "shape": {"n": n, "d": d, "m": m, "k": k, "dtype": str(x.dtype)},
        "ms": {name: round(t, 4) for name, t in ms.items()},
        "x_gemm": {name: round(t / ms["gemm"], 3) for name, t in ms.items() if name != "gemm"},
        "pick": pick,
        "roofline_ms": roof and {name: roof[name] for name in ("gemm", "fused", "chunked")},
    }


def _roofline_ms(dry: bool, shape, **options) -> dict[str, list[float]] | None:
    """The roofline's (low, high) ms of each pass at shape on this GPU, with roofline.step_time's
    options (None dry: no GPU)."""
    if dry:
        return None
    import torch

    from sae_fast.training import roofline

    gpu = roofline.GPUS["h200" if "H200" in torch.cuda.get_device_name() else "h100"]
    return {
        name: [round(t * 1e3, 3) for t in times]
        for name, times in roofline.step_time(gpu, shape, **options).items()
    }


def check_optimizer(dry: bool, device: str) -> dict[str, Any]:
    """The fused optimizer pass (kernels/adam_rows.py: projection, Adam, renormalisation)
    against the step it replaces (the projection, torch's fused Adam, the renormalisation),
    on fp32 parameters of the `gpu` preset's SAE: one step of each from the same state must
    agree; then both are timed, beside the roofline's prediction."""
    import torch

    from sae_fast import SparseAutoencoder
    from sae_fast.backends import encoders
    from sae_fast.kernels.adam_rows import adam_rows
    from sae_fast.training import roofline

    _, d, m, k = SHAPES[dry]["encoders"]
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 6.25e-10, "step": 1}

    def sae_and_grads():
        sae = SparseAutoencoder(d, m, k=k, device=device)
        sae.seed_parameters_(0)
        g = torch.Generator(device="cpu").manual_seed(1)
        for p in sae.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(device)
        return sae

    fused_sae, apart_sae = sae_and_grads(), sae_and_grads()
    moments = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in fused_sae.parameters()}

    def fused() -> None:
        for name, p in fused_sae.named_parameters():
            rows = name == "W_dec"
            adam_rows(p.data, p.grad, *moments[p], project=rows, renormalise=rows, **hyper)

    adam = torch.optim.Adam(apart_sae.parameters(), lr=hyper["lr"], eps=hyper["eps"], fused=True)

    def apart() -> None:
        apart_sae.remove_parallel_decoder_grad_()
        adam.step()
        apart_sae.normalize_decoder_()

    fused()
    apart()
    pairs = zip(fused_sae.parameters(), apart_sae.parameters(), strict=True)
    error = max(float((a - b).abs().max()) for a, b in pairs)
    seconds = _cpu_seconds if dry else encoders.gpu_seconds
    ms = {"fused": seconds(fused) * 1e3, "apart": seconds(apart) * 1e3}
    shape = roofline.Shape(n=_GPU.n, d=d, m=m, k=k, compute_dtype="bfloat16")
    roof = None
    if not dry:  # both on this GPU's model
        roof = {
            name: _roofline_ms(dry, shape, fused_optimizer=fused)["optimizer"]
            for name, fused in (("fused", True), ("apart", False))
        }
    return {
        "status": "ok" if error <= 1e-5 else "failed",
        "shape": {"m": m, "d": d, "dtype": "float32"},
        "max_abs_difference": error,
        "ms": {name: round(t, 4) for name, t in ms.items()},
        "fused_speedup": round(ms["apart"] / ms["fused"], 3),
        "roofline_ms": roof,
    }


def check_offsets(dry: bool, device: str) -> dict[str, Any]:
    """Latents whose W_enc rows start past 2^31 elements win the rows they are planted in."""
    import torch

    from sae_fast import ops

    n, d, m, k = SHAPES[dry]["offsets"]
    dtype = _dtype(dry)
    x = torch.randn(n, d, device=device).to(dtype)
    W = torch.empty(m, d, dtype=dtype, device=device).normal_(0, d**-0.5)
    far = torch.arange(m - n, m, device=device)  # the last n latents: offsets past 2^31
    W[far] = 4 * x / x.norm(dim=1, keepdim=True)  # latent m - n + r aligns with row r
    b_enc = torch.zeros(m, dtype=dtype, device=device)
    b_dec = torch.zeros(d, dtype=dtype, device=device)
    want = ops.encode_topk(x, W, b_enc, b_dec, k, backend="torch")
    out = {"shape": {"n": n, "d": d, "m": m, "k": k}, "max_offset": (m - 1) * d,
           "past_int32": (m - 1) * d >= 2**31}  # fmt: skip
    assert bool((want.indices[:, 0] == far).all()), "the planted latents do not win in torch"

    def check(name: str) -> dict[str, Any]:
        got = ops.encode_topk(x, W, b_enc, b_dec, k, backend=name)
        first = bool((got.indices[:, 0] == far).all())
        agree = float((got.indices == want.indices).all(dim=1).float().mean())
        return {"status": "ok" if first else "failed", "planted_first": first,
                "rows_as_torch": agree}  # fmt: skip

    return out | _per_gpu_backend(x, check)


def bench(dry: bool, out: Path) -> dict[str, Any]:
    from . import __main__ as cli

    args = ["run", "--out", str(out), "--suite", "ops,train_step"]
    if dry:
        args += ["--preset", "smoke", "--repeats", "1", "--backends", "torch,triton"]
        args += ["--impls", "sae_fast,reference"]
    else:
        args += ["--preset", "gpu", "--repeats", "3"]
    status = cli.main(args)
    runs = sorted(out.glob("*-*.json"), key=lambda p: p.stat().st_mtime)
    if status != 0 or not runs:
        return {"status": "failed", "exit": status}
    run = json.loads(runs[-1].read_text())
    ok = [r for r in run["records"] if r["status"] == "ok"]
    return {"status": "ok", "file": runs[-1].name, "records": len(run["records"]), "ok": len(ok)}


def run(dry: bool, out: Path, steps: list[str]) -> dict[str, Any]:
    import torch

    device = "cpu" if dry else "cuda"
    result = {"dry": dry, "env": environment(device), "steps": {}}
    result["env"]["commit"] = os.environ.get("SAE_FAST_COMMIT") or result["env"]["commit"]
    if not dry:
        result["env"]["capability"] = list(torch.cuda.get_device_capability())
    checks = {
        "exact": lambda: check_exact(dry, device),
        "offsets": lambda: check_offsets(dry, device),
        "encoders": lambda: check_encoders(dry, device),
        "optimizer": lambda: check_optimizer(dry, device),
        "bench": lambda: bench(dry, out),
    }
    for step in steps:
        started = time.perf_counter()
        try:
            report = checks[step]()
        except Exception as e:  # one step's failure is a result, and the next steps still run
            report = {"status": "error", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        report["seconds"] = round(time.perf_counter() - started, 1)
        result["steps"][step] = report
        print(f"gpu_check {step}: {json.dumps(report)[:300]}", file=sys.stderr, flush=True)
    return result


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"GPU check{' (dry run: CPU, Triton interpreter, tiny shapes)' if result['dry'] else ''}: "
        f"{env.get('gpu') or env['cpu']}, torch {env['versions']['torch']}, triton "
        f"{env['versions']['triton']}, commit {env['commit']}",
        "",
        "| step | status | seconds | details |",
        "|---|---|---:|---|",
    ]
    for step, report in result["steps"].items():
        details = {k: v for k, v in report.items() if k not in ("status", "seconds", "traceback")}
        lines.append(
            f"| {step} | {report['status']} | {report['seconds']} | `{json.dumps(details)}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for the results")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument(
        "--steps", default="exact,offsets,encoders,optimizer,bench", help="comma-separated steps"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.dry, args.out, args.steps.split(","))
    write_json(args.out / "gpu_check.json", result)
    table = markdown(result)
    (args.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
