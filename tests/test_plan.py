"""The memory model of `sae-fast plan` (training/roofline.py) against measured training runs
(SAEs and cross-layer transcoders), and the command itself.

Each size trains in a fresh process on CPU: a small run first loads the libraries' code and
the allocator's pools, then the process's peak resident memory is reset (/proc/self/clear_refs)
and its resident memory read, then the run under test trains (its steps and its final
checkpoint); the new peak above that baseline must be the model's total within 10%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sae_fast.cli import main
from sae_fast.training import roofline

PROBE = r"""
import json, re, sys, tempfile
from sae_fast.cli.train import trainer_class
from sae_fast.sources import build_source
from sae_fast.training import TrainConfig

d, m, k, n, moments, layers = sys.argv[1:7]
d, m, k, n, layers = int(d), int(m), int(k), int(n), int(layers)
clt = dict(clt=True, layers=f"0-{layers - 1}") if layers > 1 else {}

def run(m, n):
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(source="synthetic", synthetic_d=d, synthetic_features=64,
                          synthetic_active=3, seed=3, n_latents=m, k=k, steps=2, batch_size=n,
                          init_tokens=n, adam_moments=moments, out_dir=out, progress=False,
                          plots=False, checkpoint_every=0, dead_tokens=n, **clt)
        trainer_class(cfg)(cfg, build_source(cfg, "cpu")).train()

def status(field):
    text = open("/proc/self/status").read()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024

run(256, 64)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the resident memory now
base = status("VmRSS")
run(m, n)
print(json.dumps(status("VmHWM") - base))
"""


def measured_peak(probe: str, *args: object) -> int:
    """The peak resident bytes a probe's run added (its last line)."""
    # Freed buffers of 64 KiB and up go back to the OS at once, as in the benchmarks' memory
    # suite: the peak is what the run needs, not what glibc kept (otherwise it varies by a
    # tenth from run to run on a loaded machine).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", probe, *map(str, args)],
        capture_output=True, text=True, check=True, timeout=600, env=env,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("d", "m", "n", "moments"),
    [(512, 16384, 1024, "param"), (512, 32768, 1024, "bf16"), (768, 32768, 2048, "param")],
)
def test_memory_matches_a_measured_run_within_ten_percent(d, m, n, moments):
    k = 32
    measured = measured_peak(PROBE, d, m, k, n, moments, 1)
    shape = roofline.Shape(n=n, d=d, m=m, k=k, moments=moments, init_tokens=n)
    predicted = roofline.memory(shape, device="cpu").total
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


@pytest.mark.parametrize(("layers", "d", "m", "n"), [(3, 256, 8192, 1024), (4, 512, 4096, 2048)])
def test_clt_memory_matches_a_measured_run_within_ten_percent(layers, d, m, n):
    measured = measured_peak(PROBE, d, m, 32, n, "param", layers)
    shape = roofline.Shape(n=n, d=d, m=m, k=32, init_tokens=n, layers=layers)
    predicted = roofline.memory(shape, device="cpu").total
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_a_clts_parameters_are_its_encoders_and_triangle_of_decoders():
    shape = roofline.Shape(n=64, d=32, m=256, k=4, layers=5)
    assert shape.triangle == 15
    assert shape.parameters == (5 + 15) * 256 * 32 + 5 * (256 + 32)
    gpu = roofline.GPUS["h100"]
    one = roofline.step_time(gpu, roofline.Shape(n=4096, d=2304, m=16384, k=32))
    five = roofline.step_time(gpu, roofline.Shape(n=4096, d=2304, m=16384, k=32, layers=5))
    # Five encoders; fifteen decoder matrices to gather from, write and update.
    assert five["gemm"][0] == pytest.approx(5 * one["gemm"][0])
    assert five["decoder"][0] > 10 * one["decoder"][0]


def test_bf16_moments_halve_the_optimizer_state():
    fp32 = roofline.memory(roofline.Shape(n=64, d=32, m=256, k=4))
    bf16 = roofline.memory(roofline.Shape(n=64, d=32, m=256, k=4, moments="bf16"))
    assert bf16.optimizer * 2 == fp32.optimizer
    assert bf16.parameters == fp32.parameters


def test_largest_dictionary_is_the_last_that_fits():
    shape = roofline.Shape(n=8192, d=2304, m=1, k=64, compute_dtype="bfloat16")
    capacity = 80 * 2**30
    m = roofline.largest_dictionary(shape, capacity)
    assert m % 1024 == 0 and m > 0
    at = roofline.memory(roofline.Shape(**{**shape.__dict__, "m": m})).total
    over = roofline.memory(roofline.Shape(**{**shape.__dict__, "m": m + 1024})).total
    assert at <= capacity < over
    # Four latent shards hold a quarter of the latents each: about four times as many fit.
    assert roofline.largest_dictionary(shape, capacity, latent=4) > 3.5 * m


def test_fused_optimizer_moves_the_bytes_of_adam_alone():
    shape = roofline.Shape(n=8192, d=2304, m=65536, k=64, compute_dtype="bfloat16")
    gpu = roofline.GPUS["h100"]
    fused = roofline.step_time(gpu, shape)["optimizer"]
    apart = roofline.step_time(gpu, shape, fused_optimizer=False)["optimizer"]
    # 28 bytes per fp32 parameter fused; W_dec's 9 extra passes of 4 bytes apart.
    assert apart[0] / fused[0] == pytest.approx((28 * 2 + 36) / (28 * 2), rel=1e-3)


def test_plan_command_prints_each_layout(capsys):
    args = ["plan", "--d-in", "2304", "--n-latents", "65536", "--k", "64",
            "--batch-size", "8192", "--gpus", "8", "--gpu", "h100", "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["data"], r["latent"]) for r in out["layouts"]] == [(8, 1), (4, 2), (2, 4), (1, 8)]
    one = out["layouts"][0]
    assert one["memory"]["parameters"] == (2 * 65536 * 2304 + 65536 + 2304) * 4
    assert one["fits"] and one["largest_n_latents"] > 65536
    low, high = one["step_ms"]
    assert 0 < low <= high
    assert out["predicted_x_gemm"][0] <= out["predicted_x_gemm"][1]


def test_plan_covers_clts(capsys):
    args = ["plan", "--d-in", "2304", "--n-latents", "16384", "--k", "32", "--batch-size",
            "4096", "--clt-layers", "26", "--gpus", "8", "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["layers"] == 26
    one, eight = out["layouts"][0], out["layouts"][-1]
    assert one["memory"]["parameters"] == (26 + 351) * 16384 * 2304 * 4 + 26 * (16384 + 2304) * 4
    assert not one["fits"] and eight["fits"]  # only sharded by features does it fit
    assert main(["plan", "--d-in", "64", "--n-latents", "64", "--clt-layers", "0"]) == 2
    assert "--clt-layers" in capsys.readouterr().err


def test_plan_refuses_bad_sizes_by_name(capsys):
    assert main(["plan", "--d-in", "0", "--n-latents", "64", "--k", "4"]) == 2
    assert "--d-in" in capsys.readouterr().err
    assert main(["plan", "--d-in", "64", "--n-latents", "64", "--k", "65"]) == 2
    assert "--k" in capsys.readouterr().err
