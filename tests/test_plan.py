"""The memory model of `sae-fast plan` (training/roofline.py) against measured training runs,
and the command itself.

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
from sae_fast.sources import SyntheticSource
from sae_fast.training import TrainConfig
from sae_fast.training.trainer import Trainer

d, m, k, n, moments = sys.argv[1:6]
d, m, k, n = int(d), int(m), int(k), int(n)

def run(m, n):
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(source="synthetic", n_latents=m, k=k, steps=2, batch_size=n,
                          init_tokens=n, adam_moments=moments, out_dir=out, progress=False,
                          plots=False, checkpoint_every=0, dead_tokens=n)
        Trainer(cfg, SyntheticSource(d_in=d, n_features=64, k_active=3, seed=3)).train()

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


@pytest.mark.parametrize(
    ("d", "m", "n", "moments"),
    [(512, 16384, 1024, "param"), (512, 32768, 1024, "bf16"), (768, 32768, 2048, "param")],
)
def test_memory_matches_a_measured_run_within_ten_percent(d, m, n, moments):
    k = 32
    # Freed buffers of 64 KiB and up go back to the OS at once, as in the benchmarks' memory
    # suite: the peak is what the run needs, not what glibc kept (otherwise it varies by a
    # tenth from run to run on a loaded machine).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(d), str(m), str(k), str(n), moments],
        capture_output=True, text=True, check=True, timeout=600, env=env,
    )  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    shape = roofline.Shape(n=n, d=d, m=m, k=k, moments=moments, init_tokens=n)
    predicted = roofline.memory(shape, device="cpu").total
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


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


def test_plan_refuses_bad_sizes_by_name(capsys):
    assert main(["plan", "--d-in", "0", "--n-latents", "64", "--k", "4"]) == 2
    assert "--d-in" in capsys.readouterr().err
    assert main(["plan", "--d-in", "64", "--n-latents", "64", "--k", "65"]) == 2
    assert "--k" in capsys.readouterr().err
