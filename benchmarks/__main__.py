"""Command line of the benchmark suite.

    python -m benchmarks run --preset cpu                     # every suite, every implementation
    python -m benchmarks run --suite train_step --preset gpu --impls sae_fast,sparsify
    python -m benchmarks run --preset cpu --m 98304 --out /tmp/bench
    python -m benchmarks run --preset gpu-large --suite memory   # largest m each can train
    python -m benchmarks run --suite distributed --preset cpu    # 1 process, data=2, latent=2
    python -m benchmarks table benchmarks/results/*.json        # the README's summary table
    python -m benchmarks kernels                               # compile level, sm_90, no GPU
    python -m benchmarks hooks                                 # 6-hook run vs 6 single runs

Writes <out>/<preset>-<time>.json, .md and .png and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import sae_fast

from . import clt, distributed, hooks, presets, report, suites
from .compile import DEFAULT_OUT, DEFAULT_PRESETS
from .impls import PEERS


def _progress(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _suites(text: str) -> tuple[str, ...]:
    chosen = suites.SUITES if text == "all" else tuple(text.split(","))
    for suite in chosen:
        if suite not in suites.SUITES:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {suite!r} (choose from all, {', '.join(suites.SUITES)})"
            )
    return chosen


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run suites and write JSON, markdown and a plot")
    run.add_argument(
        "--suite",
        default=suites.SUITES,
        type=_suites,
        help=f"all, or comma-separated from {', '.join(suites.SUITES)}",
    )
    run.add_argument("--preset", default="cpu", choices=sorted(presets.PRESETS))
    for name in ("n", "d", "m", "k"):
        run.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    run.add_argument("--dtype", choices=sorted(presets.DTYPES), help="override the preset's dtype")
    run.add_argument("--m-sweep", type=_csv_ints, help="latent counts to probe for OOM (memory)")
    run.add_argument(
        "--backends",
        help="sae_fast backends to run, comma-separated (default: those auto-selected here)",
    )
    run.add_argument(
        "--impls",
        default="sae_fast," + ",".join(PEERS),
        help="implementations, comma-separated, from: sae_fast, sae_fast-matryoshka (its "
        "Matryoshka loss)," + ",".join(PEERS),
    )
    run.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    run.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    table = sub.add_parser("table", help="summary table of committed runs (for READMEs)")
    table.add_argument("files", nargs="+", type=Path, help="run JSON files")
    sub.add_parser("_child", help=argparse.SUPPRESS).add_argument("spec")
    kernels = sub.add_parser(
        "kernels",
        help="compile the Triton kernels for sm_90 as real launches would, without a GPU: "
        "registers, spills, shared memory, instruction mix",
    )
    kernels.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated presets")
    kernels.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    kernels.add_argument(
        "--no-sweep", action="store_true", help="skip the dtype x k sweep of the encoders"
    )
    multi = sub.add_parser("hooks", help="SAEs of several hook points: one run against one each")
    hooks.add_arguments(multi)
    multi.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    cross = sub.add_parser("clt", help="a cross-layer transcoder's step: sparse against dense")
    clt.add_arguments(cross)
    cross.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    sub.add_parser("_clt_child", help=argparse.SUPPRESS).add_argument("spec")
    return ap


def implementations(args: argparse.Namespace, device: str) -> list[str]:
    """Implementation names to run; an unknown backend or implementation is an error."""
    known = sae_fast.backends.registered()
    if args.backends:
        backends = args.backends.split(",")
        for b in backends:
            if b not in known:
                raise ValueError(f"--backends: unknown backend {b!r}; known: {known}")
    else:
        backends = sae_fast.backends.automatic(device)
    names = []
    for impl in args.impls.split(","):
        if impl in ("sae_fast", "sae_fast-matryoshka"):
            names += [f"{impl}[{b}]" for b in backends]
        elif impl in PEERS:
            names.append(impl)
        else:
            raise ValueError(
                f"--impls: unknown implementation {impl!r}; known: sae_fast, "
                f"sae_fast-matryoshka, {PEERS}"
            )
    return names


def run(args: argparse.Namespace) -> dict:
    p = presets.resolve(
        args.preset,
        n=args.n,
        d=args.d,
        m=args.m,
        k=args.k,
        dtype=args.dtype,
        m_sweep=args.m_sweep,
    )
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    names = implementations(args, p.device)
    chosen = args.suite
    if p.m_sweep and chosen != ("memory",):
        raise ValueError("an m sweep (preset gpu-large or --m-sweep) runs with --suite memory only")
    torch.manual_seed(0)
    records = []
    for suite in chosen:
        if suite == "memory":
            records += suites.memory(p, names, _progress)
        else:
            records += getattr(suites, suite)(p, names, args.repeats, _progress)
    result = {
        "preset": p.__dict__ | {"m_sweep": list(p.m_sweep)},
        "suites": list(chosen),
        "repeats": args.repeats,
        "env": report.environment(p.device),
        "records": records,
    }
    if "distributed" in chosen:  # from the formula at the gpu preset: not a measurement
        result["projection"] = distributed.projection()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "_child":
        print(json.dumps(suites.memory_child(json.loads(args.spec))))
        return 0
    if args.command == "kernels":  # a process of its own: the JIT, not the interpreter
        # TRITON_ALWAYS_COMPILE: compile times are real, not the cache's.
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_ALWAYS_COMPILE": "1"}
        command = [sys.executable, "-m", "benchmarks.compile", "--presets", args.presets]
        command += ["--out", args.out] + (["--no-sweep"] if args.no_sweep else [])
        return subprocess.run(command, env=env).returncode
    if args.command == "_clt_child":
        print(json.dumps(clt.child(json.loads(args.spec))))
        return 0
    if args.command in ("hooks", "clt"):
        bench = hooks if args.command == "hooks" else clt
        try:
            result = bench.run(args, _progress)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        stem = args.out / f"{args.command}-cpu-{time.strftime('%Y%m%d-%H%M%S')}"
        args.out.mkdir(parents=True, exist_ok=True)
        report.write_json(stem.with_suffix(".json"), result)
        table = bench.markdown(result)
        stem.with_suffix(".md").write_text(table + "\n")
        print(table)
        print(f"\nwrote {stem}.json, .md")
        return 0
    if args.command == "table":
        print(report.summary({f.name: json.loads(f.read_text()) for f in args.files}))
        return 0
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{result['preset']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    table = report.markdown(result)
    report.write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(table + "\n")
    report.plot(stem.with_suffix(".png"), result)
    print(table)
    print(f"\nwrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
