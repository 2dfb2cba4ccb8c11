"""A kernel launch as data, so that what runs and what the compile benchmark compiles are one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Launch:
    """kernel[grid](*args, **meta): run() launches it on the current device; compile(), on a
    machine without a GPU, gets exactly this specialisation's binary (kernel.warmup)."""

    kernel: Any
    grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]]
    args: tuple
    meta: dict

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)

    def compile(self) -> Any:
        """The CompiledKernel (asm, metadata) of this launch for the active Triton target."""
        return self.kernel.warmup(*self.args, grid=self.grid, **self.meta)
