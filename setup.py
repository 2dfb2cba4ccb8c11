"""Build script: metadata lives in pyproject.toml; this file adds the CUDA extension.

Env switches:
  SAE_FAST_BUILD_CUDA=auto|0|1  build sae_fast._C from csrc/ (auto: when nvcc and sources exist)
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def cuda_extensions() -> list:
    """Extensions built from csrc/; empty until the CUDA backward sources exist there."""
    mode = os.environ.get("SAE_FAST_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SAE_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.cu"))
    if mode == "1" and not sources:
        raise SystemExit("SAE_FAST_BUILD_CUDA=1 but csrc/ holds no CUDA sources")
    # The pybind11/nvcc build of sae_fast._C is added together with its sources.
    return []


setup(ext_modules=cuda_extensions())
