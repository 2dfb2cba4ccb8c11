"""The distributed benchmark suite (benchmarks/distributed.py) on the smoke preset, on gloo
processes of this machine: the collective bytes counted in torch.distributed equal the formula's
on every step of every rank, latent sharding halves the sharded state, the timings are real."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from benchmarks import __main__ as cli
from benchmarks import distributed, presets, suites

SMOKE = dict(n=64, d=32, m=256, k=4)
LAYOUTS = {"1 process": (1, 1), "data=2": (1, 2), "latent=2": (2, 1)}  # name: (L, D)


def test_the_suite_on_smoke_measures_what_the_formula_says(tmp_path, capsys):
    assert "distributed" in suites.SUITES
    assert presets.PRESETS["smoke"].n == SMOKE["n"] and presets.PRESETS["smoke"].m == SMOKE["m"]
    out = tmp_path / "out"
    assert cli.main(["run", "--suite", "distributed", "--preset", "smoke", "--out", str(out)]) == 0
    (json_file,) = out.glob("*.json")
    assert json_file.with_suffix(".png").stat().st_size > 1000
    run = json.loads(json_file.read_text())
    assert run["suites"] == ["distributed"]
    records = {r["pass"]: r for r in run["records"]}
    assert set(records) == set(LAYOUTS)
    for name, (L, D) in LAYOUTS.items():
        r = records[name]
        assert r["status"] == "ok", r.get("reason")
        assert r["suite"] == "distributed" and r["impl"] == "sae_fast"
        assert (r["latent_parallel"], r["data_parallel"]) == (L, D)
        # Measured == formula, every step of every rank (AuxK never acts: all steps alike).
        assert r["bytes_match"], r["mismatches"]
        want = distributed.expected_bytes(**SMOKE, k_aux=0, L=L, D=D, itemsize=4,
                                          auxk_active=False, clip=False)  # fmt: skip
        assert r["comm_bytes"] == r["formula_bytes"] == want
        assert r["auxk"].startswith("never acts")
        total = distributed._total_all(want)
        assert r["per_step_bytes"] == [[total] * 12] * (L * D)
        assert r["bytes_ratio_total"] == 1.0
        assert all(ratio == 1.0 for ratio in r["bytes_ratio"].values())
        # Timing: 10 timed steps, positive, and the ratio to one process.
        assert len(r["step_ms"]) == distributed.TIMED_STEPS
        assert r["ms"] > 0 and min(r["step_ms"]) > 0 and r["x_one"] > 0
        # Parameters + Adam state, as the formula says.
        assert r["state_bytes"] == r["formula_state_bytes"]["total"]
        assert r["state_bytes_per_rank"] == [r["state_bytes"]] * (L * D)
    # The groups each layout talks in, and the figures worked by hand (float32, n_l, m_l):
    assert records["1 process"]["comm_bytes"] == {}
    # data=2: grads (2*256*32 + 256 + 32)*4, firing counts 256*8, loss terms 2*8, sums (4+32)*8
    assert records["data=2"]["comm_bytes"] == {"data": {"all_reduce": 66688 + 2048 + 16 + 288}}
    assert records["data=2"]["comm_calls"] == {"data": {"all_reduce": 7}}
    # latent=2: 2 gathers of (64, 4) from 2 ranks, values float32 + indices int64; x_hat
    # (64, 32) float32, b_dec's gradient (32,), the dead count; the log row's 2 float64 apart.
    latent = records["latent=2"]
    assert latent["comm_bytes"] == {"latent": {"all_gather": 2 * 64 * 4 * (4 + 8),
                                               "all_reduce": 64 * 32 * 4 + 32 * 4 + 8}}  # fmt: skip
    assert latent["comm_calls"] == {"latent": {"all_gather": 2, "all_reduce": 3}}
    assert latent["log_row_bytes"] == {"latent": {"all_reduce": 16}}
    # Memory: latent=2 halves exactly the latent-sharded tensors; b_dec (+ moments) and the
    # Adam step counters stay whole; data=2 replicates everything.
    one = records["1 process"]
    assert one["state_sharded_bytes"] == 3 * (2 * 256 * 32 + 256) * 4
    assert one["state_replicated_bytes"] == 3 * 32 * 4 + 4 * 4
    assert latent["sharded_state_ratio"] == 0.5 and latent["replicated_state_ratio"] == 1.0
    assert (
        latent["state_bytes"] * 2 == one["state_sharded_bytes"] + 2 * one["state_replicated_bytes"]
    )
    assert records["data=2"]["state_ratio"] == 1.0
    # The tables: printed, written, and the projection marked as one.
    md = json_file.with_suffix(".md").read_text()
    printed = capsys.readouterr().out
    for text in (md, printed):
        assert "| latent=2 | latent | all_gather | 2 | 6,144 | 6,144 |" in text
        assert "PROJECTION, not a measurement" in text
    assert run["projection"]["kind"].startswith("projection")


def test_auxk_and_clipping_on_data_2_x_latent_2_in_bf16_match_the_formula_per_step():
    """4 processes (2 data ranks of 2 latent shards), bf16, dead latents from step 2 on (AuxK
    merges and decodes k_aux more), grad_clip's norm all_reduce: each step against the formula
    at that step's width."""
    p = presets.resolve("smoke", dtype="bf16")
    r = distributed.run_layout(p, "data=2 x latent=2", 4, 2, dead_tokens=64, grad_clip=1.0,
                               timed=2, warmup=1)  # fmt: skip
    assert r["status"] == "ok", r.get("reason")
    assert r["bytes_match"], r["mismatches"]
    assert r["auxk"].startswith("acts")
    first, *rest = r["per_step_bytes"][0]
    assert rest and all(b > first for b in rest)  # step 1: nothing dead yet
    k_aux = min(SMOKE["d"] // 2, SMOKE["m"])  # more latents than that are dead after step 1
    want = distributed.expected_bytes(**SMOKE, k_aux=k_aux, L=2, D=2, itemsize=2,
                                      auxk_active=True, clip=True)  # fmt: skip
    assert r["comm_bytes"] == want
    assert want["latent"]["all_gather"] == 2 * 32 * (4 + 16) * (2 + 8)
    assert want["data"]["all_reduce"] == (3 + 128 + 4 + 32) * 8 + (2 * 128 * 32 + 128 + 32) * 2
    assert r["state_bytes"] == distributed.expected_state_bytes(32, 256, 2, 2)["total"]
    assert r["ms"] > 0


def test_the_formula_at_the_gpu_preset_and_the_ring_projection():
    n, d, m, k = 8192, 2304, 65536, 64
    data8 = distributed.expected_bytes(n, d, m, k, 0, 1, 8, 2, False, False)
    grads = (2 * m * d + m + d) * 2
    assert data8 == {"data": {"all_reduce": grads + m * 8 + 2 * 8 + (4 + d) * 8}}
    latent8 = distributed.expected_bytes(n, d, m, k, 0, 8, 1, 2, False, False)
    assert latent8 == {
        "latent": {"all_gather": 8 * n * k * 10, "all_reduce": n * d * 2 + d * 2 + 8}
    }
    assert distributed.ring_seconds("all_reduce", 800, 8, 100.0) == 2 * 7 / 8 * 8
    assert distributed.ring_seconds("all_gather", 800, 8, 100.0) == 7 / 8 * 8
    assert distributed.ring_seconds("all_reduce", 800, 1, 100.0) == 0
    proj = distributed.projection()
    rows = {row["layout"]: row for row in proj["rows"]}
    assert set(rows) == {"latent=8", "data=8", "data=2 x latent=8 (2 nodes)"}
    (g,) = rows["data=8"]["groups"]
    assert g["link"] == "NVLink" and g["bytes"] == distributed._total_all(data8)
    assert g["ring_ms"] == pytest.approx(1e3 * 2 * 7 / 8 * g["bytes"] / 400e9)
    two_nodes = {g["group"]: g for g in rows["data=2 x latent=8 (2 nodes)"]["groups"]}
    assert two_nodes["latent"]["link"] == "NVLink" and two_nodes["data"]["link"] == "InfiniBand"
    assert two_nodes["data"]["ring_ms"] == pytest.approx(1e3 * two_nodes["data"]["bytes"] / 45e9)
    assert "PROJECTION, not a measurement" in distributed.projection_markdown(proj)


def test_the_counter_counts_armed_collectives_by_group_and_restores_torch():
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "barrier")}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    counter = distributed.CollectiveCounter()
    try:
        counter.install()
        group = dist.new_group([0])
        counter.name_groups(latent=group, data=None)
        t = torch.ones(10, dtype=torch.float64)
        dist.all_reduce(t)  # unarmed: not counted
        counter.phase = "step"
        dist.all_reduce(t, group=group)
        dist.all_gather([torch.empty(3, dtype=torch.int64)], torch.ones(3, dtype=torch.int64))
        dist.broadcast(torch.ones(4, dtype=torch.bfloat16), src=0)
        dist.barrier()
        box = [{"a": 1}]
        dist.broadcast_object_list(box, src=0)
        counter.phase = None
        nbytes, calls = counter.take()
        assert nbytes["latent"] == {"all_reduce": 80}
        world = nbytes["world"]
        assert (world["all_gather"], world["broadcast"], world["barrier"]) == (24, 8, 0)
        assert world["broadcast_object_list"] > 0
        assert calls == {"latent": {"all_reduce": 1}, "world": dict.fromkeys(world, 1)}
        assert counter.take() == ({}, {})
    finally:
        counter.uninstall()
        dist.destroy_process_group()
    assert {name: getattr(dist, name) for name in originals} == originals


def test_two_process_layouts_without_two_gpus_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    p = presets.Preset("gpu", 8192, 2304, 65536, 64, "bf16", "cuda")
    r = distributed.run_layout(p, "latent=2", 2, 2)
    assert r["status"] == "skipped" and "needs 2 CUDA devices, found 1" in r["reason"]
    assert "skipped: NCCL" in distributed.markdown([r], None)
