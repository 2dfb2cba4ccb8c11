"""`sae-fast train`: train an SAE."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..training.config import ConfigError, TrainConfig
from .common import GROUPS, SubParser, add_config_arguments, check_text, given_options
from .summary import RUN_COLUMNS, add_json_argument, metric_table, show, table


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    train = sub(
        "train",
        help="train an SAE",
        description="Train an SAE on model activations, a cache or synthetic data. Options "
        "come from --config (JSON or TOML, same names with underscores) and the flags, which "
        "win over the file.",
    )
    train.add_argument("--config", help="JSON or TOML file of options")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="continue the run in --out-dir from its newest checkpoint, or from the "
        "checkpoint folder given",
    )
    add_json_argument(train)
    add_config_arguments(train, tuple(GROUPS))
    train.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..parallel.layout import (
        DistributedRunError,
        build_rank_source,
        close_layout,
        init_layout,
        is_collective_failure,
        launched,
        local_device,
    )
    from ..training.checkpoints import SAE_DIR
    from ..training.config import resolve_device
    from ..training.run_folder import check_run_folder

    cfg = config_from_args(args, tuple(GROUPS))
    # What fails fast, before a model or cache loads (10-90 s): the text, the run folder.
    if cfg.source == "model":
        check_text(cfg.text, "--text")
    multi_hook = cfg.hooks is not None and not cfg.crosscoder
    if not multi_hook:
        check_run_folder(Path(cfg.out_dir), args.resume, probe_lock=not launched())
    device = resolve_device(local_device(cfg.device))
    layout = init_layout(cfg, device)
    if multi_hook:
        return _train_hooks(args, cfg, layout, device)
    finished = False
    try:
        source = build_rank_source(cfg, device, layout)
        trainer = trainer_class(cfg)(cfg, source, resume=args.resume or False, layout=layout)
        result = trainer.train()
        finished = True
    except RuntimeError as e:
        if not (layout.distributed and is_collective_failure(e)):
            raise
        first = str(e).strip().splitlines()[0]
        raise DistributedRunError(
            f"rank {layout.rank}: another process of the run stopped or did not answer "
            f"within dist_timeout={cfg.dist_timeout:g} s ({first}); the last complete "
            f"checkpoint in {cfg.out_dir} resumes with --resume"
        ) from None
    finally:
        close_layout(layout, finished)
    if not layout.main:
        return 130 if result.interrupted else 0
    final = {"step": result.step, **result.final}
    show(args, final, metric_table(final))
    if result.interrupted:
        return _interrupted(result.step, cfg.out_dir)
    what = "CLT" if cfg.clt else "crosscoder" if cfg.crosscoder else "SAE"
    print(f"saved the {what} to {result.out_dir / SAE_DIR}")
    if cfg.model_b is not None:
        print(f"model diffing: sae-fast diff {shlex.quote(str(result.out_dir / SAE_DIR))}")
    return 0


def trainer_class(cfg: TrainConfig) -> type:
    """The trainer of the run cfg describes: an SAE's or transcoder's, a cross-layer
    transcoder's or a crosscoder's."""
    from ..training import CLTTrainer, CrosscoderTrainer, Trainer

    return CLTTrainer if cfg.clt else CrosscoderTrainer if cfg.crosscoder else Trainer


def config_from_args(args: argparse.Namespace, groups: tuple[str, ...]) -> TrainConfig:
    """TrainConfig from --config (or, for --resume, the run's own options) and the flags
    given, which win."""
    given = given_options(args, groups)
    if getattr(args, "config", None):
        return TrainConfig.from_file(args.config, **given)
    if getattr(args, "resume", None):
        return _resumed_config(args.resume, given)
    return TrainConfig(**given)


def _resumed_config(resume: bool | str, given: dict) -> TrainConfig:
    """The options of the run that --resume continues (its config.json), then the flags.

    --resume alone names the run by --out-dir; --resume CHECKPOINT by the run folder the
    checkpoint is in, or by the options recorded in the checkpoint's cfg.json (then the new
    run needs its own --out-dir: the recorded one may be another run's).
    """
    from ..files import read_json
    from ..training.checkpoints import CHECKPOINTS_DIR, RUN_CONFIG_FILE

    if resume is True:
        run = Path(given.get("out_dir", TrainConfig.out_dir))
    else:
        checkpoint = Path(resume)
        run = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else None
        if run is None or not (run / RUN_CONFIG_FILE).exists():
            cfg = read_json(checkpoint / "cfg.json", ConfigError)
            train = (cfg.get("provenance") or {}).get("train") if isinstance(cfg, dict) else None
            if not isinstance(train, dict):
                raise ConfigError(
                    f"--resume: {checkpoint} records no training options; give them with "
                    "--config or the flags"
                )
            if "out_dir" not in given:
                raise ConfigError(
                    f"--resume: {checkpoint} is not in a run folder; give --out-dir for the "
                    "run that continues it"
                )
            return TrainConfig.from_dict({**train, **given}, where=str(checkpoint))
    if not (run / RUN_CONFIG_FILE).exists():
        raise ConfigError(
            f"--resume: {run} holds no run to continue (no {RUN_CONFIG_FILE}); give the "
            "run's --out-dir"
        )
    return TrainConfig.from_file(run / RUN_CONFIG_FILE, **{"out_dir": str(run), **given})


def _interrupted(step: int, out_dir: str) -> int:
    """Say how to continue a run stopped by Ctrl-C at step; its exit code."""
    print(
        f"interrupted at step {step}; continue with: sae-fast train --resume "
        f"--out-dir {shlex.quote(out_dir)}"
    )
    return 130


def _train_hooks(args: argparse.Namespace, cfg: TrainConfig, layout, device) -> int:
    """cmd_train for hooks: one SAE per hook point from one model pass, then the layer
    sweep report of their training metrics."""
    from ..parallel.layout import close_layout
    from ..training import MultiTrainer

    finished = False
    try:
        if layout.distributed:  # before the model loads on every process
            raise ConfigError("--hooks trains in one process: run it without torchrun")
        from ..sources import build_source

        source = build_source(cfg, device)
        results = MultiTrainer(cfg, source, resume=args.resume or False, layout=layout).train()
        finished = True
    finally:
        close_layout(layout, finished)
    finals = {r.out_dir.name: {"step": r.step, **r.final} for r in results}
    show(args, finals, table([{"hook": h, **f} for h, f in finals.items()], ("hook", *RUN_COLUMNS)))
    if any(r.interrupted for r in results):
        return _interrupted(results[0].step, cfg.out_dir)
    print(f"saved the SAEs to {Path(cfg.out_dir)}/HOOK/sae for the hooks {cfg.hooks}")
    if cfg.plots:
        from ..analysis.layers import TRAINING_NOTE, training_rows, write_layer_report

        hint = f"sae-fast layers {shlex.quote(cfg.out_dir)} --text FILE"
        about = f"{TRAINING_NOTE} Held-out numbers: {hint}"
        report = write_layer_report(cfg.out_dir, training_rows(cfg.out_dir), about)[-1]
        print(f"layer sweep report: {report}")
    return 0
