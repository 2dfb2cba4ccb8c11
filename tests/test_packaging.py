"""The installed package: kernels/ is sae_fast.kernels, never a top-level `kernels`."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import sae_fast

REPO = Path(__file__).resolve().parents[1]


def test_kernels_is_a_subpackage():
    module = importlib.import_module("sae_fast.kernels")
    assert Path(module.__file__).parent.name == "kernels"
    assert module.__name__ == "sae_fast.kernels"


PROBE = """
import importlib.metadata as md, importlib.util as u, sae_fast.kernels as k
print(k.__name__)
print(u.find_spec("kernels"))
print(sorted({f.parts[0] for f in md.files("sae-fast") or []}))
print(md.distribution("sae-fast").read_text("top_level.txt").split())
"""


def test_no_top_level_kernels_module_installed(tmp_path):
    # A fresh interpreter outside the checkout sees only what is installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    name, spec, file_roots, top_level = out.stdout.splitlines()
    assert name == "sae_fast.kernels"
    assert spec == "None" or str(REPO / "kernels") not in spec
    assert "'kernels'" not in file_roots
    assert "'kernels'" not in top_level


def test_public_api():
    for name in sae_fast.__all__:
        assert hasattr(sae_fast, name), name
