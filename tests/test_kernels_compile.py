"""The Triton kernels compile for a Hopper GPU (sm_90) without one, with the specialisation a
real launch gets: each launch plan of sae_fast.kernels is compiled by Triton's JIT against a
stand-in driver (benchmarks/compile.py), so pointer alignment and integer divisibility
specialise as on the GPU and the code is the pipelined code that would run. This catches what
the interpreter cannot: globals a kernel may not read, types the compiler rejects, register
spills and shared memory beyond the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
H100_SHARED_BYTES = 227 * 1024

SCRIPT = r"""
import json, time
from dataclasses import replace

from benchmarks import compile, presets

compile.fake_hopper_driver()
out = {}
gpu = presets.PRESETS["gpu"]
for name, preset in {"bf16 k=64": gpu, "fp32 k=8": replace(gpu, dtype="fp32", k=8, m=4096)}.items():
    launch, tiles = compile.encoder_launch(preset)
    started = time.perf_counter()
    report = compile.resources(launch.compile())
    report["seconds"] = time.perf_counter() - started
    report["pinned"] = [tiles.warps, tiles.stages]
    out[name] = report
out |= compile.decode_report(gpu)
out |= compile.select_report(gpu)
out |= compile.optimizer_report(gpu)
out["select_paths"] = compile.select_paths(gpu)
out["sweep"] = compile.encoder_sweep(
    gpu, ("bf16", "fp32"), (128, 256), widths=(("bf16", 2300), ("fp32", 2300))
)
fp32_selects = compile.select_report(replace(gpu, dtype="fp32"), (256,))
out |= {f"fp32 {name}": report for name, report in fp32_selects.items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


SELECTS = [f"select k={k}" for k in (32, 64, 128, 256)] + ["fp32 select k=256"]
OPTIMIZER = ["adam_rows fp32 moments", "adam_rows bf16 moments"]


@pytest.mark.parametrize(
    "kernel", ["bf16 k=64", "fp32 k=8", "gather_sum", "pair_dot", *SELECTS, *OPTIMIZER]
)
def test_kernel_compiles_for_hopper_without_spills(compiled, kernel):
    report = compiled[kernel]
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report
    assert 0 < report["registers"] <= 255
    assert report["shared_bytes"] <= H100_SHARED_BYTES


@pytest.mark.parametrize("kernel", ["bf16 k=64", "fp32 k=8"])
def test_encoder_compiles_its_pinned_config_in_seconds(compiled, kernel):
    report = compiled[kernel]
    assert [report["warps"], report["stages"]] == report["pinned"]
    assert report["seconds"] < 60, report


def test_tiles_fit_k():
    """tl.topk needs BLOCK_M >= the padded k; the running top-k must fit the registers."""
    from sae_fast.kernels import encode_topk

    for tiles in (*encode_topk.PINNED.values(), *encode_topk.CANDIDATES):
        for kp in (1, 8, 64, 256, 1024):
            fit = tiles.fit(kp)
            assert fit.block_m >= kp and fit.block_n * kp <= max(8192, 16 * kp)
            assert (fit.block_d, fit.warps, fit.stages) == (
                tiles.block_d,
                tiles.warps,
                tiles.stages,
            )


def test_autotune_candidates_are_fitted_to_k_without_repeats():
    """SAE_FAST_AUTOTUNE=1 tunes among CANDIDATES as they fit the running top-kp; candidates
    that fit to the same tiles are compiled once."""
    from sae_fast.kernels import encode_topk

    for kp in (8, 256):
        tuned = encode_topk._autotuned(kp).configs
        configs = [(c.kwargs, c.num_warps, c.num_stages) for c in tuned]
        want = [(t.fit(kp).meta(), t.warps, t.stages) for t in encode_topk.CANDIDATES]
        assert configs == [c for i, c in enumerate(want) if c not in want[:i]]
        assert all(c["BLOCK_M"] >= kp for c, _, _ in configs)
    assert len(encode_topk._autotuned(256).configs) < len(encode_topk.CANDIDATES)


def test_the_shapes_routed_away_from_the_fused_kernel_are_its_bad_binaries(compiled):
    """kernels/encode_topk.cliff sends a shape to the chunked encoder exactly where the fused
    kernel's sm_90 binary spills, leaves wgmma (16-bit inputs) or loses cp.async; the select
    those shapes go to compiles without spills."""
    for case, report in compiled["sweep"].items():
        fused = report["fused"]
        lost_wgmma = not case.startswith("fp32") and not fused["wgmma"]
        bad = fused["spill_stores"] > 0 or not fused["cp_async"] or lost_wgmma
        assert (report["routed_to_chunked"] is not None) == bad, (case, report)
        assert report["select"]["spill_stores"] == 0, (case, report["select"])
    assert compiled["sweep"]["bf16 d=2304 k=128"]["routed_to_chunked"] is None


def test_the_select_merges_only_in_the_tiles_that_gain(compiled):
    """A tile no row gains from costs the select well under one warp instruction per
    pre-activation: the tile's top-k and merge sit behind the branch, not hoisted out of it
    (they were, once: 2547 instructions per tile instead of 269)."""
    paths = compiled["select_paths"]
    assert paths["merge_per_tile"] > 4 * paths["skip_path_per_tile"], paths
    assert paths["warp_instructions_per_element"] < 1.0, paths
