"""Peak extra memory and time of the TopK encoder: sae_fast's torch backend vs the dense reference.

Each implementation runs in a fresh process. After the inputs exist, the process resets its
peak-RSS mark (/proc/self/clear_refs) and the op's peak extra memory is VmHWM minus the RSS
before it. Times are medians over repeats after one warm-up, next to the dense encoder GEMM
x @ W_enc.T of the same shape (the floor, DESIGN §6) timed in the same process.

    python -m benchmarks.encode_memory                 # n=2048 d=768 m=24576 k=32 fp32
    python -m benchmarks.encode_memory --m 65536 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

IMPLS = ("reference", "torch")
PASSES = ("encode", "encode+decode+backward")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_extra_mib(fn) -> float:
    """Run fn once; the peak RSS it added above the RSS before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def child(impl: str, n: int, d: int, m: int, k: int, repeats: int) -> dict:
    """Measure one implementation in this process; returns its figures."""
    import torch

    import sae_fast
    from sae_fast import reference as ref

    torch.manual_seed(0)
    x = torch.randn(n, d)
    W_enc = torch.randn(m, d).div_(d**0.5)
    W_dec = W_enc.clone()
    b_enc, b_dec = torch.zeros(m), torch.zeros(d)
    params = [t.requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]

    if impl == "reference":

        def encode():
            return ref.encode_topk(x, W_enc, b_enc, b_dec, k)

        def decode(values, indices):
            return ref.decode(values, indices, W_dec, b_dec)
    else:

        def encode():
            return tuple(sae_fast.encode_topk(x, W_enc, b_enc, b_dec, k, backend=impl))

        def decode(values, indices):
            return sae_fast.decode(values, indices, W_dec, b_dec, backend=impl)

    def encode_only():
        with torch.no_grad():
            encode()

    def train_pass():
        x_hat = decode(*encode())
        (x_hat - x).pow(2).sum().backward()
        for p in params:
            p.grad = None

    with torch.no_grad():
        values = encode()[0]
        checksum = float(values.double().sum())
    results = {"impl": impl, "threads": torch.get_num_threads(), "checksum": checksum}
    for name, fn in zip(PASSES, (encode_only, train_pass), strict=True):
        results[name] = {"peak_extra_mib": _peak_extra_mib(fn), "ms": _median_ms(fn, repeats)}
    with torch.no_grad():
        results["gemm_ms"] = _median_ms(lambda: x @ W_enc.T, repeats)
    return results


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--m", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.n, args.d, args.m, args.k)
    if min(shape) < 1 or args.k > args.m:
        parser.error("--n, --d, --m, --k must be >= 1 and --k <= --m")
    if args.child:
        print(json.dumps(child(args.child, *shape, args.repeats)))
        return 0

    import torch

    runs = {}
    for impl in IMPLS:
        print(f"[{impl}] measuring ...", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.encode_memory", "--child", impl]
        cmd += [f"--{a}={v}" for a, v in zip("ndmk", shape, strict=True)]
        cmd += [f"--repeats={args.repeats}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[impl] = json.loads(out.stdout)
    ref_sum, ours_sum = runs["reference"]["checksum"], runs["torch"]["checksum"]
    if abs(ref_sum - ours_sum) > 1e-4 * abs(ref_sum):
        raise SystemExit(f"outputs differ: sum of values {ours_sum} vs reference {ref_sum}")

    dense_mib = args.n * args.m * 4 / 2**20
    print(
        f"\nTopK encoder, n={args.n} d={args.d} m={args.m} k={args.k}, float32, "
        f"{runs['torch']['threads']} threads, {_cpu_model()}"
    )
    print(
        f"one dense (n, m) float32 matrix: {dense_mib:.1f} MiB; "
        f"dense GEMM floor: {runs['torch']['gemm_ms']:.1f} ms\n"
    )
    print("| pass | impl | peak extra MiB | median ms | x GEMM |")
    print("|---|---|---:|---:|---:|")
    for pass_ in PASSES:
        for impl in IMPLS:
            r = runs[impl][pass_]
            ratio = r["ms"] / runs[impl]["gemm_ms"]
            print(f"| {pass_} | {impl} | {r['peak_extra_mib']:.1f} | {r['ms']:.1f} | {ratio:.2f} |")
    if args.json:
        meta = {
            "device": "cpu",
            "cpu": _cpu_model(),
            "torch": torch.__version__,
            "commit": _git_commit(),
            "dtype": "float32",
            "shape": dict(zip("ndmk", shape, strict=True)),
        }
        with open(args.json, "w") as f:
            json.dump({**meta, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
