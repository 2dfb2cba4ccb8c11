"""When a kernel cannot be built for the device: the torch computation instead, one warning.

Triton raises a compile or resource error (too much shared memory, registers, a ptxas
failure) at the first launch of a specialisation. Fallback remembers the launch keys that
failed, warns once for each, naming the reason, and runs the torch computation for them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


def is_build_error(error: Exception) -> bool:
    """Whether error says the kernel could not be built or launched for this device: Triton's
    own errors, and the plain RuntimeError of a failed compiler pass (a bug of Triton's, seen
    with some layouts)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import AutotunerError, OutOfResources, PTXASError

    if isinstance(error, (CompilationError, OutOfResources, PTXASError, AutotunerError)):
        return True
    return isinstance(error, RuntimeError) and "PassManager::run failed" in str(error)


class Fallback:
    """kernel() for a launch key, or torch() once that key's kernel failed to build."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failed: set[Hashable] = set()

    def __call__(self, key: Hashable, kernel: Callable[[], T], torch: Callable[[], T]) -> T:
        if key not in self.failed:
            try:
                return kernel()
            except Exception as e:
                if not is_build_error(e):
                    raise
                self.failed.add(key)
                warnings.warn(
                    f"sae_fast: the Triton {self.what} kernel cannot run here for {key} "
                    f"({type(e).__name__}: {e}); the torch backend computes it instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return torch()
