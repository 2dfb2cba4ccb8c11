"""Real `sae-fast train` processes: Ctrl-C saves and exits 130, and the command it prints
continues the run; a second run on the same folder is refused while the first lives, and
a killed run's folder is free again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from sae_fast.training.checkpoints import list_checkpoints


def train_args(out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sae_fast",
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


def start(out) -> subprocess.Popen:
    """A long run in out, once it has written its first checkpoint."""
    proc = subprocess.Popen(
        train_args(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc


def test_sigint_saves_a_checkpoint_and_the_printed_command_finishes(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    hint = stdout.strip().splitlines()[-1]
    assert hint.startswith("interrupted at step")
    command = hint.split("continue with: sae-fast ")[1].split()
    assert command == ["train", "--resume", "--out-dir", str(out)]
    stopped = int(list_checkpoints(out / "checkpoints")[-1].name.removeprefix("step-"))
    assert 5 <= stopped < 100000
    # Only what the hint says (and how far to go): the run's own options come from its folder.
    finish = [sys.executable, "-m", "sae_fast", *command, f"--steps={stopped + 3}"]
    done = subprocess.run(finish, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resuming with steps={stopped + 3} (the checkpoint had 100000)" in done.stdout
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{stopped + 3:08d}"
    assert (out / "sae" / "cfg.json").is_file()


def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_one_frees_it(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "sae_fast", "train", "--resume", "--out-dir", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert "Traceback" not in second.stderr
        assert f"is in use by another sae-fast training run (pid {proc.pid}" in second.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    killed_at = int(list_checkpoints(out / "checkpoints")[-1].name.removeprefix("step-"))
    finish = [sys.executable, "-m", "sae_fast", "train", "--resume", "--out-dir", str(out)]
    done = subprocess.run([*finish, f"--steps={killed_at + 2}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{killed_at + 2:08d}"
