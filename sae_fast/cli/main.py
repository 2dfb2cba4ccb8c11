"""The `sae-fast` parser, one subparser per command module, and main: dispatch and the one-line
errors."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn

from ..training.config import ConfigError
from ..version import VERSION
from . import (
    cache,
    compare,
    convert,
    dashboard,
    demo,
    diff,
    drift,
    evaluate,
    explain,
    inspect_sae,
    layers,
    plan,
    report,
    split,
    toy,
    train,
)

# In the order help lists them.
COMMANDS = (
    train,
    split,
    cache,
    evaluate,
    drift,
    compare,
    diff,
    explain,
    dashboard,
    demo,
    report,
    layers,
    toy,
    convert,
    inspect_sae,
    plan,
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or the help gives it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A parser whose errors print a one-line usage (positionals, then [options]) and the
    error last: the nearest flag's hint is the line a user reads, not 40 lines of usage."""

    def error(self, message: str) -> NoReturn:
        positionals = [a.metavar or a.dest for a in self._actions if not a.option_strings]
        usage = " ".join([self.prog, *map(str, positionals), "[options]"])
        self.exit(2, f"usage: {usage} (--help lists them)\n{self.prog}: error: {message}\n")


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """The error for arguments parser does not know, with the nearest flag of each."""
    flags = [f for action in parser._actions for f in action.option_strings]
    parts = []
    for arg in extra:
        near = difflib.get_close_matches(arg.split("=")[0], flags, n=1) if arg[:1] == "-" else []
        parts.append(f"{arg} (did you mean {near[0]}?)" if near else arg)
    return "unrecognized arguments: " + " ".join(parts)


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether torch raised e for an allocation that does not fit (CPU or GPU)."""
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sae-fast",
        description="Train, cache, evaluate, report and demo sparse autoencoders.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sae-fast {VERSION}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def sub(name: str, **kw) -> argparse.ArgumentParser:
        command = commands.add_parser(name, formatter_class=_Formatter, allow_abbrev=False, **kw)
        command.set_defaults(parser=command)
        return command

    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # the subcommand's usage and the nearest flag, not the top-level usage
        args.parser.error(_unrecognized(args.parser, extra))
    from ..analysis.feature_stats import FeatureStatsError
    from ..backends import BackendUnavailableError
    from ..checkpoint import CheckpointError
    from ..files import FolderInUseError
    from ..parallel.layout import DistributedRunError
    from ..sources import HookPointError, SourceError
    from ..training import TrainingDivergedError

    user_errors = (
        ConfigError,
        SourceError,
        HookPointError,
        CheckpointError,
        BackendUnavailableError,
        FolderInUseError,
        FeatureStatsError,
        ImportError,
        OSError,
    )
    try:
        return args.fn(args)
    except user_errors as e:
        # An OSError we raised says what failed in its strerror; the system's name a file.
        said = e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else e
        print(f"sae-fast {args.command}: error: {said}", file=sys.stderr)
        return 2
    except (TrainingDivergedError, DistributedRunError) as e:
        print(f"sae-fast {args.command}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # an allocation the size checks did not foresee
        if not _out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0]
        print(
            f"sae-fast {args.command}: error: out of memory ({first}); lower the sizes "
            "(--batch-size, --n-latents, --shuffle-buffer, ...)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:  # outside training, which stops cleanly by itself
        print(f"sae-fast {args.command}: interrupted", file=sys.stderr)
        return 130
