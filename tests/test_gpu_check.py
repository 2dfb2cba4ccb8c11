"""benchmarks/gpu_check.sh, the one command a lent GPU runs, checked by its dry mode: the
same steps on the CPU, tiny shapes, the Triton kernels under the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_check
from sae_fast import ops

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_writes_its_files(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = ["exact", "offsets", "encoders", "optimizer", "bench"]
    assert result["dry"] and list(result["steps"]) == steps
    assert all(step["status"] == "ok" for step in result["steps"].values()), result
    for backend in ("triton", "chunked"):
        assert result["steps"]["exact"][backend]["rows_identical"] == 1.0
        assert result["steps"]["offsets"][backend]["planted_first"]
    encoders = result["steps"]["encoders"]
    assert set(encoders["ms"]) == {"gemm", "gemm_topk", "fused", "chunked"}
    assert encoders["pick"] in ("fused", "chunked") and encoders["x_gemm"]["fused"] > 0
    optimizer = result["steps"]["optimizer"]
    assert optimizer["max_abs_difference"] <= 1e-5 and set(optimizer["ms"]) == {"fused", "apart"}
    assert "skipped" in (tmp_path / "pytest-gpu.txt").read_text()  # no GPU: they skip
    (bench,) = tmp_path.glob("smoke-*.json")
    assert {r["impl"] for r in json.loads(bench.read_text())["records"]} >= {"sae_fast[triton]"}
    assert "| exact | ok |" in (tmp_path / "gpu_check.md").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool returns from $OUT


def test_a_wrong_code_fails_the_exact_check(monkeypatch):
    pytest.importorskip("triton")
    encode = ops.encode_topk

    def swapped(*args, backend=None, **kwargs):
        code = encode(*args, backend=backend, **kwargs)
        if backend == "triton":  # the 1st and 2nd latents of every row swapped
            code.indices[:, [0, 1]] = code.indices[:, [1, 0]]
        return code

    monkeypatch.setattr(ops, "encode_topk", swapped)
    result = gpu_check.run(True, Path("."), ["exact"])
    exact = result["steps"]["exact"]
    assert exact["status"] == "failed" and exact["triton"]["rows_identical"] == 0.0
