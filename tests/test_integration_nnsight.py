"""A sae_fast SAE and transcoder spliced into an nnsight trace of a tiny random GPT-2: the
checks of nnsight_checks.py, in a Python of their own (see there why)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integrations import require

require("nnsight", load=False)

CHECKS = ["reconstruct:", "error term:", "steer:", "transcoder:"]


def test_nnsight_trace_splices_reads_and_steers():
    script = Path(__file__).with_name("nnsight_checks.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [line.split(":")[0] + ":" for line in done.stdout.splitlines()] == CHECKS
