"""The suites: ops, train_step, memory, distributed. Each returns records (one dict per figure).

A record: {"suite", "pass", "impl", "status", ...}; status "ok" carries "ms", "floor_ms" and
"x_floor" (the median ratio of its time to the dense encoder GEMM x @ W_enc.T, the two timed
in alternation in the same process) or "peak_mib";
other statuses ("skipped", "mismatch", "oom", "error") carry "reason". The distributed
suite's records (benchmarks/distributed.py) carry per-layout step time, collective bytes
(measured and by formula) and parameter + optimizer-state bytes per rank.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch

import sae_fast

from . import distributed as distributed_suite
from .impls import Impl, Weights, activations, make
from .measure import is_oom, paired_ms, peak_extra_mib
from .presets import Preset

SUITES = ("ops", "train_step", "memory", "distributed")
Progress = Callable[[str], None]


def sae_fast_output(w: Weights, x: torch.Tensor, k: int) -> torch.Tensor:
    """sae_fast's reconstruction, by its default backend: what every implementation must match."""
    with torch.no_grad():
        code = sae_fast.encode_topk(x, w.W_enc, w.b_enc, w.b_dec, k)
        return sae_fast.decode(code.values, code.indices, w.W_dec, w.b_dec)


def mismatch(impl: Impl, x: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why impl's x_hat is not ours, or None.

    Rows may differ where a near-tie at the k-th latent rounds the other way; allow one row in
    a thousand, and hold the others to float tolerance.
    """
    with torch.no_grad():
        got = impl.forward(x).float()
    if got.shape != want.shape:
        return f"x_hat has shape {tuple(got.shape)}, sae_fast's {tuple(want.shape)}"
    tol = (1e-3 if x.dtype == torch.float32 else 3e-2) * want.abs().max().item()
    bad = int(((got - want.float()).abs().amax(dim=1) > tol).sum())
    if bad > x.shape[0] // 1000 + 1:
        return f"x_hat differs from sae_fast's in {bad} of {x.shape[0]} rows (tolerance {tol:.2g})"
    return None


def _record(suite: str, pass_: str, impl: str, status: str, **fields) -> dict:
    return {"suite": suite, "pass": pass_, "impl": impl, "status": status, **fields}


def _prepared(suite: str, names: list[str], p: Preset, progress: Progress):
    """For each implementation in turn: (name, impl or None, x, weights, (status, reason)).

    impl is built and checked against sae_fast's output; None if it cannot run or differs.
    """
    w = Weights.random(p.d, p.m, p.torch_dtype, p.device)
    x = activations(p.n, p.d, p.torch_dtype, p.device)
    want = sae_fast_output(w, x, p.k)
    for i, name in enumerate(names, 1):
        progress(f"[{suite} {i}/{len(names)}] {name}")
        impl = make(name)
        reason = impl.why_not(p.device)
        if reason is None:
            try:
                impl.build(w, p.k)
                reason = mismatch(impl, x, want)
                status = "mismatch"
            except Exception as e:  # a peer failing to build is reported, not fatal
                reason, status = f"{type(e).__name__}: {e}", "oom" if is_oom(e) else "error"
        else:
            status = "skipped"
        yield name, (impl if reason is None else None), x, w, (status, reason)
        del impl
        gc.collect()


def ops(p: Preset, names: list[str], repeats: int, progress: Progress) -> list[dict]:
    """encode and decode (no grad), and forward + backward of each library's loss."""
    records, floors = [], []
    for name, impl, x, w, (status, reason) in _prepared("ops", names, p, progress):
        if impl is None:
            records += [_record("ops", ps, name, status, reason=reason) for ps in OPS_PASSES]
            continue
        with torch.no_grad():
            code = impl.encode(x)

        def encode(impl=impl, x=x):
            with torch.no_grad():
                impl.encode(x)

        def decode(impl=impl, code=code):
            with torch.no_grad():
                impl.decode(code)

        def forward_backward(impl=impl, x=x):
            impl.loss(x).backward()
            impl.zero_grad()

        for pass_, fn in zip(OPS_PASSES, (encode, decode, forward_backward), strict=True):
            records.append(_timed("ops", pass_, name, fn, p, w, x, repeats, floors))
    return _with_floor(records, "ops", floors)


OPS_PASSES = ("encode", "decode", "forward+backward")


def train_step(p: Preset, names: list[str], repeats: int, progress: Progress) -> list[dict]:
    """Forward + backward + Adam step + each library's decoder-norm handling."""
    records, floors = [], []
    for name, impl, x, w, (status, reason) in _prepared("train_step", names, p, progress):
        if impl is None:
            records.append(_record("train_step", "train_step", name, status, reason=reason))
            continue

        def step(impl=impl, x=x):
            impl.train_step(x)

        records.append(_timed("train_step", "train_step", name, step, p, w, x, repeats, floors))
    return _with_floor(records, "train_step", floors)


def _timed(suite, pass_, name, fn, p, w, x, repeats, floors: list[float]) -> dict:
    """Time fn in alternation with the floor, so both see the same machine state."""

    def gemm():
        with torch.no_grad():
            x @ w.W_enc.T

    ms, floor, ratio = paired_ms(fn, gemm, p.device, repeats)
    floors.append(floor)
    return _record(suite, pass_, name, "ok", ms=ms, floor_ms=floor, x_floor=ratio)


def _with_floor(records: list[dict], suite: str, floors: list[float]) -> list[dict]:
    """Prepend the floor: the median of the floor timings taken beside each figure."""
    if not floors:
        return records
    floor = _record(suite, "dense encoder GEMM", "floor", "ok", ms=statistics.median(floors))
    return [{**floor, "x_floor": 1.0}, *records]


MEMORY_PASSES = ("encode", "train_step")


def distributed(p: Preset, names: list[str], repeats: int, progress: Progress) -> list[dict]:
    """sae_fast's Trainer on 1 process, (data=2) and (latent=2): see benchmarks/distributed.py.

    names and repeats do not apply: it runs sae_fast alone, a fixed 2 warm-up + 10 timed steps.
    """
    return distributed_suite.suite(p, progress)


def memory(p: Preset, names: list[str], progress: Progress) -> list[dict]:
    """Peak extra memory of encode and of a steady-state train step, each library in its own
    process. With p.m_sweep, every m in it (train_step only), stopping at a library's first
    failure (out of memory, or a process the system killed).
    """
    if not p.m_sweep:
        records = []
        for i, name in enumerate(names, 1):
            progress(f"[memory {i}/{len(names)}] {name}")
            records += _memory_child(p, name, MEMORY_PASSES)
        return records
    records, stopped = [], set()
    for m in p.m_sweep:
        sized = Preset(**{**asdict(p), "m": m, "m_sweep": ()})
        for name in names:
            if name in stopped:
                continue
            progress(f"[memory m={m}] {name}")
            for r in _memory_child(sized, name, ("train_step",)):
                records.append({**r, "m": m})
                if r["status"] != "ok":  # an OOM (or a crash) at m: larger m would fail too
                    stopped.add(name)
    return records


def _memory_child(p: Preset, name: str, passes: tuple[str, ...]) -> list[dict]:
    spec = {"preset": asdict(p), "impl": name, "passes": passes, "threads": torch.get_num_threads()}
    # Freed buffers of 64 KiB and up go back to the OS at once, so the RSS peak of a pass is
    # what that pass needs, not what the allocator kept from earlier ones.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "benchmarks", "_child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return [_record("memory", ps, name, "error", reason=" | ".join(tail)) for ps in passes]
    return json.loads(lines[-1])


def memory_child(spec: dict) -> list[dict]:
    """In a fresh process: build one implementation and measure the peak of each pass."""
    p = Preset(**{**spec["preset"], "m_sweep": tuple(spec["preset"]["m_sweep"])})
    torch.set_num_threads(spec["threads"])
    name, passes = spec["impl"], spec["passes"]
    impl = make(name)
    reason = impl.why_not(p.device)
    if reason is not None:
        return [_record("memory", ps, name, "skipped", reason=reason) for ps in passes]
    x = activations(p.n, p.d, p.torch_dtype, p.device)
    records = []
    try:
        impl.build(Weights.random(p.d, p.m, p.torch_dtype, p.device), p.k)
        impl.train_step(x)  # optimizer state exists before the steady-state step is measured

        def encode():
            with torch.no_grad():
                impl.encode(x)

        fns = {"encode": encode, "train_step": lambda: impl.train_step(x)}
        for ps in passes:
            records.append(
                _record("memory", ps, name, "ok", peak_mib=peak_extra_mib(fns[ps], p.device))
            )
    except Exception as e:
        status = "oom" if is_oom(e) else "error"
        done = {r["pass"] for r in records}
        records += [
            _record("memory", ps, name, status, reason=f"{type(e).__name__}: {e}")
            for ps in passes
            if ps not in done
        ]
    return records
