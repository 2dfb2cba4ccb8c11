"""A run folder's life apart from the steps: its lock, the checkpoint a run starts from (or
the refusal of a new run where checkpoints are), the options a resume may change, and the
newer branch a resume from an older checkpoint moves aside."""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from ..files import check_unlocked, clean_stale, lock_folder
from ..options import parse_matryoshka
from ..parallel.layout import Layout, agree
from . import checkpoints
from .config import REFUSE, ConfigError, TrainConfig

RUN_LOCK = "sae-fast training run"  # what holds a run folder's lock, as messages say


class RunFolder:
    """A run's out_dir: locked by the main process from acquire() to close() (a second run
    on it gets FolderInUseError), its checkpoints under checkpoints/."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path, self.layout = path, layout
        self.checkpoints = path / checkpoints.CHECKPOINTS_DIR
        self._lock = None

    def acquire(self) -> None:
        """Lock the folder (again, after close()); FolderInUseError if another run holds it."""
        if self._lock is None and self.layout.main:
            self._lock = lock_folder(self.path, RUN_LOCK)
            self._lock.__enter__()

    def close(self) -> None:
        """Release the folder."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def start(self, resume: bool | str | Path) -> Path | None:
        """The checkpoint the run continues from: None for a new run (refused where
        checkpoints are), the newest for resume=True, the one named otherwise. The scratch
        a killed write left goes first."""
        if self.layout.main:
            for folder in (self.path, self.checkpoints):
                clean_stale(folder)
        found = agree(checkpoints.list_checkpoints(self.checkpoints), self.layout)
        if not resume:
            if found:
                raise occupied(self.path)
            return None
        if resume is not True:
            return Path(resume)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {self.checkpoints}")
        return found[-1]

    def resumed(self, step: int, checkpoint: Path) -> None:
        """Say where the run continues and move the newer branch aside; every rank waits."""
        if self.layout.main:
            print(f"sae-fast: resuming {self.path} from step {step} (checkpoint {checkpoint})")
            abandon_after(self.path, step)
        if self.layout.distributed:
            dist.barrier()

    def check_options(
        self, cfg: TrainConfig, saved: dict, step: int, checkpoint: Path, n_latents: int
    ) -> None:
        """Refuse the changed options that shaped the checkpoint; log the others."""
        # An option newer than the checkpoint had its default there.
        was = {f.name: saved.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)}
        changed = [
            (f, was[f.name], getattr(cfg, f.name))
            for f in dataclasses.fields(TrainConfig)
            if not same_option(f.name, was[f.name], getattr(cfg, f.name), n_latents)
        ]
        refused = [
            f"{f.name}={new!r} (the checkpoint has {old!r})"
            for f, old, new in changed
            if f.metadata["resume"] == REFUSE
        ]
        if refused:
            raise ConfigError(
                f"--resume: checkpoint {checkpoint} was trained with other values of options "
                f"that shape the SAE or its data: {'; '.join(refused)}; resume with the "
                "checkpoint's values, or start a new run"
            )
        if cfg.steps < step:
            raise ConfigError(
                f"--resume: steps={cfg.steps} is below the checkpoint's step {step}: "
                f"give --steps {step} or more"
            )
        for f, old, new in changed if self.layout.main else ():
            if f.name != "out_dir":
                print(f"sae-fast: resuming with {f.name}={new!r} (the checkpoint had {old!r})")


def same_option(name: str, old: object, new: object, n_latents: int) -> bool:
    """Whether two values of an option mean the same run: equal, or Matryoshka prefix sizes
    that name the same prefixes of a dictionary of n_latents (16,64 and 16,64,256 of 256)."""
    if old == new:
        return True
    if name == "matryoshka" and isinstance(old, str) and isinstance(new, str):
        return parse_matryoshka(old, n_latents) == parse_matryoshka(new, n_latents)
    return False


def occupied(out_dir: Path) -> ConfigError:
    """The refusal of a new run in a folder that already holds checkpoints."""
    return ConfigError(
        f"out_dir {out_dir} already holds checkpoints: resume it (--resume) or choose "
        "another out_dir"
    )


def check_run_folder(out_dir: Path, resume: bool | str, probe_lock: bool = True) -> None:
    """Before anything slow (a model, a cache): a new run's folder holds no checkpoints, and
    (probe_lock) no other run holds its lock. Trainer checks both again, holding the lock."""
    if not resume and checkpoints.list_checkpoints(out_dir / checkpoints.CHECKPOINTS_DIR):
        raise occupied(out_dir)
    if probe_lock:
        check_unlocked(out_dir, RUN_LOCK)


def abandon_after(out_dir: Path, step: int) -> None:
    """Move the checkpoints of the run in out_dir newer than step (and the SAE exported from
    them) aside, to checkpoints/abandoned-TIME-PID/, with a copy of the metrics log."""
    root = out_dir / checkpoints.CHECKPOINTS_DIR
    last = checkpoints.folder_name(step)
    newer = [p for p in checkpoints.list_checkpoints(root) if p.name > last]
    if not newer:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside = root / f"abandoned-{stamp}-{os.getpid()}"
    aside.mkdir()
    exported = out_dir / checkpoints.SAE_DIR
    for path in [*newer, *([exported] if exported.exists() else [])]:
        os.rename(path, aside / path.name)
    log = out_dir / checkpoints.METRICS_FILE
    if log.exists():  # its rows past step go with the branch (the run's log is cut back)
        shutil.copy2(log, aside / log.name)
    print(
        f"sae-fast: resumed from step {step}; moved the newer {[p.name for p in newer]} of "
        f"the abandoned branch to {aside}"
    )
