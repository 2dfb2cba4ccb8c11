"""What a training loop holds between its steps: its logs and bar (Loop), a Ctrl-C that stops
it after the current step (StopOnInterrupt), and the progress it shows."""

from __future__ import annotations

import dataclasses
import signal
import threading
from dataclasses import dataclass
from typing import Any

from .config import TrainConfig
from .metrics import MetricsLog


@dataclass
class Loop:
    """A run between Trainer.running() and finish(): its last step, logs and last row."""

    stop: int
    log: MetricsLog
    sinks: Any
    bar: Any
    label: str
    started: float
    tokens_at: int
    row: dict = dataclasses.field(default_factory=dict)


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) asks the loop to stop after the current step.

    Stopping between steps keeps model, optimizer and data position consistent for the
    checkpoint written at exit; a second Ctrl-C interrupts at once. Outside the main thread
    signals cannot be caught and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nsae-fast: stopping after this step and saving a checkpoint (Ctrl-C again aborts)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def progress_bar(cfg: TrainConfig, initial: int, main: bool):
    """The tqdm bar of a run at step initial, shown when cfg.progress on the main process."""
    from tqdm.auto import tqdm

    shown = cfg.progress and main
    return tqdm(total=cfg.steps, initial=initial, disable=not shown, unit="step")


def log_line(row: dict, steps: int) -> str:
    """One line of a logged row, for runs without a progress bar."""
    return (
        f"step {row['step']}/{steps}  fvu {row['fvu']:.4f}  l0 {row['l0']:.1f}  "
        f"dead {row['dead_fraction']:.3f}  loss {row['loss']:.4g}  lr {row['lr']:.3g}  "
        f"{row['tokens_per_s']:,.0f} tokens/s"
    )
