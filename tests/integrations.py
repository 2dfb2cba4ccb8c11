"""The libraries the drop-in layers plug into (the `integrations` extra): tests import them
through require, which skips where one is missing, and fails instead where
SAE_FAST_REQUIRE_INTEGRATIONS=1 (CI, which installs them all)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("SAE_FAST_REQUIRE_INTEGRATIONS") == "1"


def require(module: str, *, load: bool = True) -> ModuleType | None:
    """The module (None with load=False: only checked to be installed), else skip or fail."""
    if importlib.util.find_spec(module) is None:
        why = f"{module} is not installed (pip install -e '.[integrations]')"
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why, allow_module_level=True)
    return importlib.import_module(module) if load else None
