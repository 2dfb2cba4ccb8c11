"""The libraries the drop-in layers plug into (the `integrations` extra): tests import them
through require, which skips where one is missing, and fails instead where
SAE_FAST_REQUIRE_INTEGRATIONS=1 (CI, which installs them all)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REQUIRED = os.environ.get("SAE_FAST_REQUIRE_INTEGRATIONS") == "1"


def require(module: str, *, load: bool = True) -> ModuleType | None:
    """The module (None with load=False: only checked to be installed), else skip or fail."""
    if importlib.util.find_spec(module) is None:
        why = f"{module} is not installed (pip install -e '.[integrations]')"
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why, allow_module_level=True)
    return importlib.import_module(module) if load else None


def without_sae_fast(code: str, x: torch.Tensor, tmp_path: Path) -> tuple[torch.Tensor, str]:
    """Run code in a fresh Python where importing sae_fast fails: code reads the tensor `x`
    and sets the tensor `y`. Returns (y, what code printed)."""
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['sae_fast'] = None  # importing sae_fast now raises ImportError\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"{code}\n"
        "assert not any(m.startswith('sae_fast') for m in sys.modules if sys.modules[m])\n"
        f"torch.save(y.detach(), {str(tmp_path / 'y.pt')!r})\n"
    )
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}  # sparsify's CPU decoder
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "y.pt"), done.stdout.strip()
