"""Test setup: the Triton interpreter where there is no GPU, and GPU tests that skip without one.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before
anything else imports torch or triton.
"""

import os
import shutil
import signal

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def signal_handlers_kept():
    """SAELens's runners install SIGINT and SIGTERM handlers for good: put the previous ones
    back after the test, so the rest of the session sees the handlers it started with."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in kept.items():
        signal.signal(sig, handler)
