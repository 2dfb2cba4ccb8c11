"""What a run writes: JSON with the environment, a markdown table, a PNG plot."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

import torch

from . import distributed

PACKAGES = ("sae-fast", "torch", "triton", "eai-sparsify", "sae-lens")


def environment(device: str) -> dict:
    """Device, processor, threads, versions and git commit of this run."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit.stdout.strip() or None,
        "uncommitted_changes": bool(dirty.stdout.strip()),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, run: dict) -> None:
    path.write_text(json.dumps(run, indent=2) + "\n")


def markdown(run: dict) -> str:
    """One table of every record: time and ratio to the floor, or peak memory, or why not."""
    p = run["preset"]
    lines = [
        f"preset {p['name']}: n={p['n']} d={p['d']} m={p['m']} k={p['k']} {p['dtype']} on "
        f"{run['env']['gpu'] or run['env']['cpu']}, {run['env']['threads']} threads",
    ]
    # The distributed suite's records have tables of their own, below.
    spread = [r for r in run["records"] if r["suite"] == "distributed"]
    others = [r for r in run["records"] if r["suite"] != "distributed"]
    if others or not spread:
        lines += [
            "",
            "| suite | pass | impl | m | median ms | x floor | peak extra MiB | note |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
    for r in others:
        ms = f"{r['ms']:.2f}" if "ms" in r else ""
        ratio = f"{r['x_floor']:.2f}" if "x_floor" in r else ""
        peak = f"{r['peak_mib']:.1f}" if "peak_mib" in r else ""
        note = "" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        m = r.get("m", p["m"])
        lines.append(
            f"| {r['suite']} | {r['pass']} | {r['impl']} | {m} | {ms} | {ratio} | {peak} | {note} |"
        )
    if spread or run.get("projection"):
        lines += ["", distributed.markdown(spread, run.get("projection"))]
    return "\n".join(lines)


def summary(runs: dict[str, dict]) -> str:
    """One row per (run file, implementation): the figures the README cites, from the JSON."""
    lines = [
        "| run | device | impl | encode x floor | fwd+bwd x floor | train step ms | "
        "train step x floor | encode peak MiB | train step peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    hooks = {name: run for name, run in runs.items() if run.get("benchmark") == "hooks"}
    clts = {name: run for name, run in runs.items() if run.get("benchmark") == "clt"}
    for name, run in runs.items():
        if name in hooks or name in clts:  # their own tables, below
            continue
        device = run["env"]["gpu"] or f"{run['env']['cpu']} ({run['env']['threads']} threads)"
        figures: dict[str, dict] = {}
        for r in run["records"]:
            if (
                r["status"] == "ok"
                and r["impl"] != "floor"
                and "m" not in r
                and r["suite"] != "distributed"
            ):
                figures.setdefault(r["impl"], {})[(r["suite"], r["pass"])] = r
        for impl, f in figures.items():

            def cell(suite, pass_, key, fmt, f=f):
                r = f.get((suite, pass_))
                return format(r[key], fmt) if r else "-"

            cells = (
                name,
                device,
                impl,
                cell("ops", "encode", "x_floor", ".2f"),
                cell("ops", "forward+backward", "x_floor", ".2f"),
                cell("train_step", "train_step", "ms", ".0f"),
                cell("train_step", "train_step", "x_floor", ".2f"),
                cell("memory", "encode", "peak_mib", ".1f"),
                cell("memory", "train_step", "peak_mib", ".1f"),
            )
            lines.append("| " + " | ".join(cells) + " |")
    if hooks:
        lines += [
            "",
            "| run | SAEs | multi-hook run s | single-hook runs s | speed-up | bit-equal |",
            "|---|---:|---:|---:|---:|---|",
        ]
    for name, run in hooks.items():
        median = run["median_seconds"]
        lines.append(
            f"| {name} | {len(run['options']['hooks'])} | {median['multi']:.1f} | "
            f"{median['single']:.1f} | {run['speedup']:.2f} | {run['bit_equal']} |"
        )
    if clts:
        lines += [
            "",
            "| run | CLT (L, d, m, k, n) | way | step ms | x GEMMs | peak MiB |",
            "|---|---|---|---:|---:|---:|",
        ]
    for name, run in clts.items():
        shape = ", ".join(str(run["shape"][key]) for key in ("layers", "d", "m", "k", "n"))
        for r in run["records"]:
            if r["status"] == "ok":
                lines.append(
                    f"| {name} | {shape} | {r['way']} | {r['ms']:.0f} | {r['x_gemm']:.2f} | "
                    f"{r['peak_mib']:.0f} |"
                )
    return "\n".join(lines)


def plot(path: Path, run: dict) -> None:
    """Time as a ratio to the floor (train_step and forward+backward) and peak memory per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in run["records"] if r["status"] == "ok" and r["impl"] != "floor"]
    timed = [r for r in ok if r["pass"] in ("train_step", "forward+backward") and "x_floor" in r]
    peaks = [r for r in ok if "peak_mib" in r and "m" not in r]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    _bars(ax_time, timed, "x_floor", "time / dense encoder GEMM")
    ax_time.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    _bars(ax_mem, peaks, "peak_mib", "peak extra memory (MiB)")
    p = run["preset"]
    fig.suptitle(
        f"{p['name']}: n={p['n']} d={p['d']} m={p['m']} k={p['k']} {p['dtype']}, "
        f"{run['env']['gpu'] or run['env']['cpu']} ({run['env']['commit'] or 'no commit'})"[:120]
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, records: list[dict], key: str, label: str) -> None:
    labels = [f"{r['impl']}\n{r['pass']}" for r in records]
    values = [r[key] for r in records]
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f" if key == "x_floor" else "%.0f", fontsize=8)
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(label)
    if not records:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
