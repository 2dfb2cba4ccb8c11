"""Optional metric sinks beside the JSONL log: TensorBoard and Weights & Biases (wandb).

`open_sinks` opens the sinks a run asks for; `MetricSinks.write(row)` logs every numeric
field of a metrics row (bools and strings are skipped) at step row["step"]. Neither package
is imported unless its sink is asked for; a missing one raises ImportError naming the extra
that installs it.

TensorBoard writes event files to out_dir/tensorboard. A resumed run opens its writer with
purge_step = resume_step + 1, so TensorBoard drops the events a crashed run wrote past the
checkpoint it resumes from, as MetricsLog.truncate_after does for the JSONL log.

wandb runs offline unless WANDB_MODE says otherwise ("online", "disabled"), with its files
in out_dir/wandb: offline it needs no account and opens no network connection, and
`wandb sync out_dir/wandb/offline-run-*` uploads the run later. The run id is kept in
out_dir/wandb_run_id, so a resumed run continues the same wandb run. Everything else
(entity, run name, tags, console capture) follows wandb's own WANDB_* variables.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

from ..files import atomic_path, read_text

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"
# What wandb runs as when WANDB_MODE is not set: no account, no network.
WANDB_DEFAULT_MODE = "offline"


def numeric_fields(row: dict) -> dict[str, float | int]:
    """The fields of a metrics row that a sink logs: ints and floats (NaN and inf too), not
    bools, strings or the "step" itself."""
    return {
        key: value
        for key, value in row.items()
        if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class MetricSinks:
    """The open sinks of one run: `write(row)` logs a metrics row to each, `close()` ends them.

    A context manager: leaving the block closes the sinks, marking the wandb run failed when
    an exception leaves it.
    """

    def __init__(self, tensorboard: Any = None, wandb_run: Any = None) -> None:
        self.tensorboard = tensorboard  # torch.utils.tensorboard.SummaryWriter or None
        self.wandb_run = wandb_run  # wandb.Run or None
        self.closed = False

    def write(self, row: dict) -> None:
        """Log the numeric fields of row (all but "step") at step row["step"]."""
        if self.closed:
            raise ValueError("MetricSinks.write after close()")
        step = row["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"metrics row step must be an int, got {step!r}")
        fields = numeric_fields(row)
        if self.tensorboard is not None:
            for key, value in fields.items():
                self.tensorboard.add_scalar(key, float(value), global_step=int(step))
        if self.wandb_run is not None:
            self.wandb_run.log(fields, step=int(step))

    def close(self) -> None:
        """Flush and close every sink; a second call does nothing."""
        self._close(exit_code=0)

    def _close(self, exit_code: int) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.tensorboard is not None:
                self.tensorboard.close()
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(exit_code=0 if exc_type is None else 1)


def open_sinks(
    out_dir: Path,
    run_config: dict,
    *,
    tensorboard: bool,
    wandb: bool,
    wandb_project: str | None,
    resume_step: int | None,
) -> MetricSinks:
    """Open the sinks a run asks for, in out_dir (created if missing).

    run_config: the run's settings, stored as the wandb run's config. wandb_project: the
    wandb project (None: WANDB_PROJECT, else wandb's default). resume_step: the step of the
    checkpoint a resumed run starts from, None for a new run; a resumed run purges later
    TensorBoard events and continues the wandb run whose id out_dir holds, a new run starts
    a new wandb run. With both flags False nothing is imported or written.
    """
    if not (tensorboard or wandb):
        return MetricSinks()
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks = MetricSinks()
    try:
        if tensorboard:
            sinks.tensorboard = _open_tensorboard(out_dir, resume_step)
        if wandb:
            sinks.wandb_run = _open_wandb(out_dir, run_config, wandb_project, resume_step)
    except BaseException:
        sinks._close(exit_code=1)
        raise
    return sinks


def _open_tensorboard(out_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            'tensorboard logging needs the tensorboard package: pip install "sae-fast[tensorboard]"'
        ) from e
    purge_step = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge_step)


def _open_wandb(out_dir: Path, run_config: dict, project: str | None, resume_step: int | None):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            'wandb logging needs the wandb package: pip install "sae-fast[wandb]"'
        ) from e
    id_file = out_dir / WANDB_RUN_ID_FILE
    run_id = None
    if resume_step is not None and id_file.exists():
        run_id = read_text(id_file, OSError).strip() or None
    mode = os.environ.get("WANDB_MODE") or WANDB_DEFAULT_MODE
    run = wandb.init(
        project=project,
        dir=str(out_dir),
        config=run_config,
        mode=mode,
        id=run_id,
        resume="allow",
    )
    if not getattr(run, "disabled", False) and run.id != run_id:
        with atomic_path(id_file) as tmp:
            tmp.write_text(run.id + "\n")
    return run
