"""Ctrl-C on a real `sae-fast train` process: it saves, exits 130, and --resume finishes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from sae_fast.training.checkpoints import list_checkpoints


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "sae_fast.cli",
        "train",
        "--source=synthetic",
        "--synthetic-d=16",
        "--n-latents=64",
        "--k=4",
        "--batch-size=64",
        "--init-tokens=64",
        "--steps=100000",
        "--checkpoint-every=5",
        "--no-progress",
        "--no-plots",
        f"--out-dir={out}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout
    stopped = int(list_checkpoints(out / "checkpoints")[-1].name.removeprefix("step-"))
    assert 5 <= stopped < 100000
    finish = [*args, f"--steps={stopped + 3}", "--resume"]  # the last --steps wins
    done = subprocess.run(finish, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{stopped + 3:08d}"
    assert (out / "sae" / "cfg.json").is_file()
