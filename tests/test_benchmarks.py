"""The benchmark suite end to end on the smoke preset, its checks and its errors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import statistics

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import impls, measure, presets, suites
from sae_fast.training.losses import LossWeights, training_loss


def run_cli(tmp_path, *args: str) -> dict:
    out = tmp_path / "out"
    assert cli.main(["run", "--preset", "smoke", "--repeats", "1", "--out", str(out), *args]) == 0
    (json_file,) = out.glob("*.json")
    assert json_file.with_suffix(".png").stat().st_size > 1000
    assert "| suite | pass | impl |" in json_file.with_suffix(".md").read_text()
    return json.loads(json_file.read_text())


def test_smoke_run_all_suites(tmp_path, capsys):
    run = run_cli(tmp_path, "--impls", "sae_fast,reference")
    assert run["preset"]["name"] == "smoke" and run["suites"] == list(suites.SUITES)
    assert run["env"]["threads"] == torch.get_num_threads()
    assert run["env"]["versions"]["torch"] == importlib.metadata.version("torch")
    ok = {(r["suite"], r["pass"], r["impl"]) for r in run["records"] if r["status"] == "ok"}
    for impl in ("sae_fast[torch]", "reference"):
        for pass_ in suites.OPS_PASSES:
            assert ("ops", pass_, impl) in ok
        assert ("train_step", "train_step", impl) in ok
        for pass_ in suites.MEMORY_PASSES:
            assert ("memory", pass_, impl) in ok
    floors = [r for r in run["records"] if r["impl"] == "floor"]
    assert {r["suite"] for r in floors} == {"ops", "train_step"}
    for suite in ("ops", "train_step"):
        timed = [r for r in run["records"] if r["suite"] == suite and r["impl"] != "floor"]
        floor = next(f["ms"] for f in floors if f["suite"] == suite)
        assert floor == pytest.approx(statistics.median(r["floor_ms"] for r in timed))
    for r in run["records"]:
        if r["suite"] == "memory":
            assert r["peak_mib"] >= 0
    assert "| train_step | train_step | sae_fast[torch] |" in capsys.readouterr().out

    (json_file,) = (tmp_path / "out").glob("*.json")
    assert cli.main(["table", str(json_file)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "sae_fast[torch]" in line]
    step = next(
        r for r in run["records"] if r["impl"] == "sae_fast[torch]" and r["suite"] == "train_step"
    )
    assert len(rows) == 1 and f"| {step['x_floor']:.2f} |" in rows[0]


def test_the_matryoshka_step_runs_beside_the_plain_one(tmp_path):
    run = run_cli(tmp_path, "--suite", "train_step", "--impls", "sae_fast,sae_fast-matryoshka")
    ok = {r["impl"] for r in run["records"] if r["status"] == "ok"}
    assert {"sae_fast[torch]", "sae_fast-matryoshka[torch]"} <= ok
    # It times the trainer's Matryoshka loss (over FVU's denominator, as the plain step).
    nested = impls.make("sae_fast-matryoshka[torch]")
    nested.build(impls.Weights.random(32, 256, torch.float32, "cpu"), 4)
    assert nested.sae.matryoshka == [32, 64, 128, 256]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    want = training_loss(nested.sae, x, LossWeights(auxk=0)).terms["matryoshka"]
    total = (x - x.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(nested.loss(x).detach() * total, want)


def test_missing_peer_is_reported_as_skipped(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sparsify" else real(name, *a)
    )
    run = run_cli(tmp_path, "--suite", "train_step", "--impls", "sparsify")
    (record,) = [r for r in run["records"] if r["impl"] == "sparsify"]
    assert record["status"] == "skipped"
    assert "eai-sparsify is not installed" in record["reason"]


class _Wrong(impls.Reference):
    """A library that computes another function: it must not be timed."""

    name = "wrong"

    def forward(self, x):
        return super().forward(x) + 1.0


def test_an_implementation_that_differs_is_not_timed(monkeypatch):
    monkeypatch.setattr(suites, "make", lambda name: _Wrong())
    p = presets.resolve("smoke")
    (record,) = [r for r in suites.train_step(p, ["wrong"], 1, print) if r["impl"] == "wrong"]
    assert record["status"] == "mismatch" and "ms" not in record
    assert "x_hat differs from sae_fast's in 64 of 64 rows" in record["reason"]


def test_m_sweep_records_each_m(tmp_path):
    run = run_cli(tmp_path, "--suite", "memory", "--impls", "sae_fast", "--m-sweep", "64,128")
    assert [(r["m"], r["pass"], r["status"]) for r in run["records"]] == [
        (64, "train_step", "ok"),
        (128, "train_step", "ok"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backends", "cudnn"], "--backends: unknown backend 'cudnn'"),
        (
            ["--impls", "sae_fast,dictionary_learning"],
            "unknown implementation 'dictionary_learning'",
        ),
        (["--k", "300"], "k=300 must not exceed the number of latents"),
        (["--m-sweep", "64"], "runs with --suite memory only"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_clear_errors(tmp_path, capsys, args, message):
    assert cli.main(["run", "--preset", "smoke", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--suite", "speed"), ("--preset", "tpu")])
def test_unknown_suite_or_preset(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", flag, value])
    assert exit_info.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err


def test_gpu_presets_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="runs on CUDA, and no CUDA device is available"):
        presets.resolve("gpu")


def test_presets_hold_the_issue_shapes():
    cpu, gpu, large = (presets.PRESETS[n] for n in ("cpu", "gpu", "gpu-large"))
    assert (cpu.n, cpu.d, cpu.m, cpu.k, cpu.dtype) == (2048, 768, 24576, 32, "fp32")
    assert (gpu.n, gpu.d, gpu.m, gpu.k, gpu.dtype) == (8192, 2304, 65536, 64, "bf16")
    assert large.d == 768 and max(large.m_sweep) == 1 << 20


def test_paired_timing_reports_medians_and_the_median_ratio(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    costs = iter([9.0, 9.0, 2.0, 1.0, 4.0, 1.0, 3.0, 1.0])  # warm-up pair, then 3 timed pairs

    def tick():
        clock[0] += next(costs)

    ms, floor, ratio = measure.paired_ms(tick, tick, "cpu", repeats=3)
    assert (ms, floor, ratio) == (3000.0, 1000.0, 3.0)


def test_is_oom():
    assert measure.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert measure.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate: out of memory"))
    assert not measure.is_oom(RuntimeError("shape mismatch"))


def test_compile_level_benchmark_at_the_gpu_preset(tmp_path, capsys):
    """python -m benchmarks kernels: no GPU, the real launch's code for sm_90."""
    pytest.importorskip("triton")
    out = tmp_path / "kernels"
    # The sweep's shapes compile in tests/test_kernels_compile.py.
    assert cli.main(["kernels", "--presets", "gpu", "--out", str(out), "--no-sweep"]) == 0
    (json_file,) = out.glob("kernels-sm90-*.json")
    result = json.loads(json_file.read_text())
    gpu = result["presets"]["gpu"]
    assert gpu["shape"] == {"n": 8192, "d": 2304, "m": 65536, "k": 64, "dtype": "bf16"}
    encoder = gpu["encoder"]
    assert encoder["spill_stores"] == 0 and encoder["grid"][1] >= 2  # latent splits
    assert encoder["gemm_per_tile"] == encoder["gemm_loop_body"] * -(-2304 // 64)
    assert encoder["gemm_mix_per_tile"]["mma"] > 0  # the loop found is the tensor-core one
    seen = encoder["replay"]
    assert abs(seen["skip"] + seen["light"] + seen["full"] - 1) < 1e-9 and seen["full"] > 0
    assert 0 < encoder["selection_per_tile"] < encoder["epilogue_static"]
    assert gpu["plain_gemm"]["gemm_per_tile"] > 0
    # Each path read from the shipped binary; a flush there is dearer than its PROBE variant.
    parts, probes = encoder["selection_parts"], encoder["probe_parts"]
    assert parts["extraction_iteration"] == probes["extraction_iteration"] > 0
    assert parts["flush"] > probes["flush"] > 0 and parts["full"] > parts["always"] > 0
    assert set(encoder["replay_orders"]) == {"iid", "rising", "falling", "dead_prefix"}
    rising, iid = encoder["replay_orders"]["rising"], encoder["replay_orders"]["iid"]
    assert rising["full"] > iid["full"]  # each tile beats the last: more full merges
    assert gpu["select_paths"]["warp_instructions_per_element"] < 1.0
    for name in ("h100", "h200"):
        fused, chunked = (
            gpu["time_model"][name]["predicted_x_cublas"][p] for p in ("fused", "chunked")
        )
        assert 1.0 <= fused[0] <= fused[1] and 1.0 <= chunked[0] <= chunked[1]
    assert gpu["sweep"] == {}
    assert "| gpu | encoder |" in json_file.with_suffix(".md").read_text()


def test_the_hooks_benchmark_times_both_ways_and_checks_them_equal(tmp_path, capsys):
    from model_folders import save_bert, write_corpus

    model = save_bert(tmp_path / "bert")
    text = write_corpus(tmp_path / "text.txt")
    args = ["hooks", "--model", model, "--hooks", "resid_post.0-1", "--text", text]
    args += ["--steps", "2", "--batch-size", "32", "--n-latents", "64", "--k", "4"]
    args += ["--shuffle-buffer", "64", "--context-size", "16", "--repeats", "1"]
    args += ["--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    (record,) = (tmp_path / "out").glob("hooks-cpu-*.json")
    run = json.loads(record.read_text())
    assert run["bit_equal"] is True and run["options"]["hooks"] == ["resid_post.0", "resid_post.1"]
    assert run["sae_tokens"] == 2 * 32 * 2
    assert run["speedup"] == run["median_seconds"]["single"] / run["median_seconds"]["multi"]
    assert "Speed-up" in capsys.readouterr().out
    assert cli.main(["table", str(record)]) == 0  # the summary lists it in its own table
    assert f"| {record.name} | 2 |" in capsys.readouterr().out


def test_the_clt_benchmark_checks_both_ways_equal_then_times_and_measures_them(tmp_path, capsys):
    args = ["clt", "--layers", "3", "--d", "16", "--m", "96", "--k", "4", "--n", "32"]
    args += ["--repeats", "1", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    (record,) = (tmp_path / "out").glob("clt-cpu-*.json")
    run = json.loads(record.read_text())
    assert run["shape"] == {"layers": 3, "d": 16, "m": 96, "k": 4, "n": 32}
    assert run["max_error"] < 1e-4
    assert [r["way"] for r in run["records"]] == ["sparse", "dense"]
    for r in run["records"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["gemm_ms"] > 0 and r["peak_mib"] >= 0
    assert "| sparse |" in capsys.readouterr().out
    assert cli.main(["table", str(record)]) == 0  # the summary lists it in its own table
    assert f"| {record.name} | 3, 16, 96, 4, 32 | dense |" in capsys.readouterr().out
    assert cli.main(["clt", "--repeats", "0", "--out", str(tmp_path)]) == 2


def test_the_clt_benchmarks_dense_way_is_the_definition():
    from benchmarks.clt import dense_outputs
    from sae_fast import reference
    from sae_fast.clt import CrossLayerTranscoder

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(3, 8, 40, k=3, dtype=torch.float64)
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    pre = torch.stack(
        [reference.pre_activation(x[i], clt.W_enc[i], clt.b_enc[i], 0) for i in range(3)]
    )
    z = torch.stack([reference.sparse_to_dense(*reference.topk(p, 3), 40) for p in pre])
    want = reference.clt_decode(z, list(clt.W_dec), clt.b_dec)
    torch.testing.assert_close(dense_outputs(clt, x), want)
    torch.testing.assert_close(clt(x).y_hat, want)
