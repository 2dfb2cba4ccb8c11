"""Several SAEs from one model pass: one Trainer per hook point, stepping in lockstep.

A run with hooks (e.g. resid_post.0-5) trains one SAE per hook point. The model runs once
per batch of windows (a ModelSource on all the hook points), sources.hook_streams gives
each trainer its hook point's columns of the shared shuffled rows, and the trainers take
their steps in turn. Each is an ordinary run in out_dir/HOOK, with its own optimizer,
metrics, checkpoints, sae/ and plots, so whatever reads a run reads each of them, and each
SAE gets the weights a single-hook run on its hook point would (same windows, shuffle,
seed). out_dir/config.json records the run as a whole (its "hooks" map each hook point to
its folder).

--resume continues every SAE from the newest step that all of them have a checkpoint of:
a run killed while writing its checkpoints leaves some a step behind, and the newer
checkpoints of the others move aside as any abandoned branch does (Trainer); killed before
all of them had a first checkpoint, every SAE starts again from step 0. Memory is the
sum of the SAEs and one shuffle buffer as wide as all the hook points together.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path

from ..files import atomic_path, lock_folder, read_json
from ..options import parse_hooks
from ..parallel.layout import Layout, local_device
from ..sources.model import ModelSource
from ..sources.streams import hook_streams
from ..validation import check_fits, parse_dtype
from . import checkpoints
from .config import ConfigError, TrainConfig, resolve_device
from .loop import StopOnInterrupt, progress_bar
from .run_folder import abandon_after
from .trainer import Trainer, TrainResult, parameter_bytes

HOOKS_KEY = "hooks"  # in out_dir/config.json: hook point -> its run's folder name


def hook_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """One single-hook run's options per hook point of cfg.hooks, each in out_dir/HOOK."""
    if cfg.hooks is None:
        raise ConfigError("a multi-hook run needs hooks")
    if cfg.keep_checkpoints < 2:
        # A kill between the SAEs' saves leaves some a step behind: with one checkpoint
        # each, no step would be left that all of them have.
        raise ConfigError("hooks needs keep_checkpoints >= 2, to resume from a common step")
    runs = []
    for hook in parse_hooks(cfg.hooks):
        if "/" in hook or hook in (".", ".."):
            raise ConfigError(f"hooks: {hook!r} cannot name a run folder")
        out_dir = str(Path(cfg.out_dir) / hook)
        runs.append(dataclasses.replace(cfg, hook=hook, hooks=None, out_dir=out_dir))
    return runs


def hook_runs(folder: str | Path) -> dict[str, Path] | None:
    """hook point -> its run folder, of the multi-hook run in folder (its config.json maps
    hook points to runs); None for another run. ConfigError if config.json is missing or
    damaged."""
    folder = Path(folder)
    body = read_json(folder / checkpoints.RUN_CONFIG_FILE, ConfigError)
    hooks = body.get(HOOKS_KEY) if isinstance(body, dict) else None
    if not isinstance(hooks, dict) or not hooks:
        return None
    return {hook: folder / name for hook, name in hooks.items()}


def is_multi_hook_run(folder: str | Path) -> bool:
    """Whether folder holds a multi-hook run."""
    try:
        return hook_runs(folder) is not None
    except ConfigError:  # no run, or not one of ours
        return False


def _common_step(runs: list[TrainConfig]) -> list[Path] | list[bool]:
    """Per run, its checkpoint of the newest step every run has one of; with none in common
    (a run killed between its SAEs' first checkpoints), False for each: every SAE starts
    again from step 0, its checkpoints moved aside as an abandoned branch."""
    found = [
        checkpoints.list_checkpoints(Path(r.out_dir) / checkpoints.CHECKPOINTS_DIR) for r in runs
    ]
    if not any(found):
        out_dir = Path(runs[0].out_dir).parent
        raise ConfigError(f"--resume: no checkpoint to resume in the runs under {out_dir}")
    names = set.intersection(*({p.name for p in paths} for paths in found))
    if names:
        newest = max(names)
        return [Path(r.out_dir) / checkpoints.CHECKPOINTS_DIR / newest for r in runs]
    have = {r.hook: [p.name for p in paths] for r, paths in zip(runs, found, strict=True)}
    print(f"sae-fast: the hook points have no checkpoint of one step in common ({have}); "
          "every SAE starts again from step 0")  # fmt: skip
    for run in runs:
        abandon_after(Path(run.out_dir), 0)
    return [False] * len(runs)


class MultiTrainer:
    """Train one SAE per hook point of cfg.hooks on source (a ModelSource on those hook
    points, in that order), as the module docstring says.

    resume: False starts a new run, True continues the run in cfg.out_dir from the newest
    step all its SAEs have. out_dir is locked, and so is each SAE's folder.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        source: ModelSource,
        resume: bool = False,
        layout: Layout | None = None,
    ) -> None:
        if layout is not None and layout.distributed:
            raise ConfigError(
                "hooks under torchrun: a multi-hook run trains in one process; train the "
                "hook points as separate distributed runs (--hook)"
            )
        if not isinstance(resume, bool):
            raise ConfigError(
                "--resume CHECKPOINT with hooks: a multi-hook run resumes as a whole; give "
                "--resume alone with its --out-dir"
            )
        runs = hook_configs(cfg)
        if tuple(r.hook for r in runs) != source.hooks:
            raise ConfigError(
                f"hooks={cfg.hooks!r} but the source reads the hook points {list(source.hooks)}"
            )
        # Each trainer checks its own SAE; together they must fit too.
        needed = sum(
            parameter_bytes(cfg.latents(w), 2 * w, parse_dtype(cfg.dtype), cfg.adam_moments)
            for w in source.widths
        )
        device = resolve_device(local_device(cfg.device))
        check_fits(needed, f"{len(runs)} SAEs ({cfg.dtype}, with Adam)", device, ConfigError)
        self.cfg, self.source, self.out_dir = cfg, source, Path(cfg.out_dir)
        self._lock = lock_folder(self.out_dir, "sae-fast multi-hook training run")
        self._lock.__enter__()
        self.trainers: list[Trainer] = []
        try:
            starts = _common_step(runs) if resume else [False] * len(runs)
            for run, stream, start in zip(runs, hook_streams(source), starts, strict=True):
                self.trainers.append(Trainer(run, stream, resume=start))
        except BaseException:
            self.close()
            raise

    @property
    def step(self) -> int:
        return self.trainers[0].step

    def close(self) -> None:
        """Release out_dir and every SAE's folder."""
        for trainer in self.trainers:
            trainer.close()
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def _write_run_config(self) -> None:
        body = {
            "train": self.cfg.to_dict(),
            "source": self.source.describe(),
            HOOKS_KEY: {t.cfg.hook: Path(t.cfg.out_dir).name for t in self.trainers},
        }
        with atomic_path(self.out_dir / checkpoints.RUN_CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(body, indent=2) + "\n")

    def train(self, until: int | None = None) -> list[TrainResult]:
        """Run every SAE to cfg.steps (or to step `until`), one step each in turn; Ctrl-C
        stops them all after the same step. One TrainResult per hook point."""
        if self._lock is None:
            self._lock = lock_folder(self.out_dir, "sae-fast multi-hook training run")
            self._lock.__enter__()
        try:
            for trainer in self.trainers:
                trainer.acquire()
            self._write_run_config()
            return self._train(until)
        finally:
            self.close()

    def _train(self, until: int | None) -> list[TrainResult]:
        trainers = self.trainers
        with ExitStack() as stack:
            interrupt = stack.enter_context(StopOnInterrupt())
            bar = stack.enter_context(progress_bar(self.cfg, self.step, True))
            loops = [
                stack.enter_context(t.running(until, None, f"{t.cfg.hook}: ", warnings=i == 0))
                for i, t in enumerate(trainers)
            ]
            while self.step < loops[0].stop and not interrupt.requested:
                for trainer, loop in zip(trainers, loops, strict=True):
                    trainer.advance(loop)
                bar.update(1)
                fvu = [loop.row["fvu"] for loop in loops]
                bar.set_postfix(fvu=f"{min(fvu):.3f}-{max(fvu):.3f}")
        return [
            t.finish(loop, interrupt.requested) for t, loop in zip(trainers, loops, strict=True)
        ]
