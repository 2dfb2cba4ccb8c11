"""`sae-fast train` under real torchrun launches: one machine, two "nodes" joined by a c10d
rendezvous on 127.0.0.1, Ctrl-C on one rank; and a run whose rank is killed mid-run (the
other stops, no hang, and the last complete checkpoint resumes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from test_distributed_training import free_port

from sae_fast import SparseAutoencoder
from sae_fast.training.checkpoints import list_checkpoints

TRAIN = [
    "-m", "sae_fast", "train", "--source", "synthetic", "--synthetic-d", "12",
    "--synthetic-features", "48", "--n-latents", "64", "--k", "4", "--batch-size", "32",
    "--init-tokens", "64", "--lr", "3e-3", "--dead-tokens", "32", "--log-every", "1",
    "--no-plots", "--no-progress", "--device", "cpu", "--dist-timeout", "60",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0", *args]


def run(command: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_torchrun_trains_latent_sharded_and_only_rank_0_logs(tmp_path):
    """The `sae-fast` entry point under torchrun (--no-python runs it as the command)."""
    out = tmp_path / "run"
    launch = ["--nproc-per-node", "2", "--master-port", str(free_port()), "--no-python"]
    entry = shutil.which("sae-fast")
    assert entry, "the sae-fast entry point is not installed"
    done = run(torchrun(*launch, entry, *TRAIN[2:], "--steps", "4", "--latent-parallel", "2",
                        "--out-dir", str(out), "--json"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 4/4") == 1  # one metric line per step: rank 0's
    assert done.stdout.count('"step": 4') == 1
    layout = json.loads((out / "config.json").read_text())["layout"]
    assert layout == {"world": 2, "data_parallel": 1, "latent_parallel": 2}
    assert SparseAutoencoder.load(out / "sae").n_latents == 64


def test_two_nodes_joined_by_a_c10d_rendezvous(tmp_path):
    """Two torchrun invocations, one process each, as two machines would run them."""
    out, port = tmp_path / "run", free_port()

    def node(rank: int) -> subprocess.Popen:
        launch = ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                  "--rdzv-id", "sae-test"]  # fmt: skip
        command = torchrun(*launch, *TRAIN, "--steps", "3", "--out-dir", str(out))
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV)  # fmt: skip

    nodes = [node(0), node(1)]
    results = [node.communicate(timeout=180) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]
    layout = json.loads((out / "config.json").read_text())["layout"]
    assert layout == {"world": 2, "data_parallel": 2, "latent_parallel": 1}
    assert sum(stdout.count("step 3/3") for stdout, _ in results) == 1


def _workers(agent: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_a_killed_rank_stops_the_others_and_its_last_checkpoint_resumes(tmp_path):
    """Two ranks started as torchrun starts them (its environment), without its agent, so
    the survivor must stop by itself: one line, exit 1, well before a hang would end."""
    out, port = tmp_path / "run", free_port()
    train = [*TRAIN, "--steps", "100000", "--checkpoint-every", "2", "--latent-parallel", "2",
             "--out-dir", str(out)]  # fmt: skip

    def rank(r: int) -> subprocess.Popen:
        env = {**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        return subprocess.Popen([sys.executable, *train], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip

    survivor, victim = rank(0), rank(1)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list_checkpoints(out / "checkpoints"), "no checkpoint appeared"
    victim.kill()
    victim.communicate()
    started = time.monotonic()
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 1
    assert time.monotonic() - started < 50  # it did not wait for its 60 s timeout
    (line,) = [e for e in err.splitlines() if e.startswith("sae-fast train:")]
    assert "rank 0: another process of the run stopped" in line and "--resume" in line
    last = list_checkpoints(out / "checkpoints")[-1]
    step = int(last.name.split("-")[1])
    # The last complete checkpoint resumes, here on one process.
    done = run([sys.executable, *TRAIN, "--steps", str(step + 2), "--latent-parallel", "1",
                "--resume", "--out-dir", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step {step + 2}/{step + 2}" in done.stdout
    sae = SparseAutoencoder.load(out / "sae")
    assert sae.provenance["step"] == step + 2 and torch.isfinite(sae.W_dec).all()


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGINT to rank 1 alone: both ranks stop after one step and write its checkpoint."""
    out = tmp_path / "run"
    launch = ["--nproc-per-node", "2", "--master-port", str(free_port()), "--monitor-interval", "3"]
    train = [*TRAIN, "--steps", "100000", "--checkpoint-every", "1000", "--latent-parallel", "2",
             "--out-dir", str(out)]  # fmt: skip
    agent = subprocess.Popen(
        torchrun(*launch, *train), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _workers(agent.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGINT)
    stdout, err = agent.communicate(timeout=120)
    (last,) = list_checkpoints(out / "checkpoints")  # the one written at the stop
    step = int(last.name.split("-")[1])
    assert f"interrupted at step {step}" in stdout, err[-3000:]
    done = run([sys.executable, *TRAIN, "--steps", str(step + 1), "--latent-parallel", "1",
                "--resume", "--out-dir", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
