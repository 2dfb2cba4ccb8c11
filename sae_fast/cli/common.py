"""What the commands share: the TrainConfig options as flag groups, the data options an SAE
records, the model an SAE reads, and the flags of commands that run an SAE over text."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from ..options import decimal, integer
from ..training.config import ConfigError, TrainConfig, field_type

# build_parser's sub(name, **kw): makes one command's subparser.
SubParser = Callable[..., argparse.ArgumentParser]

GROUPS = {
    "data": "activations",
    "sae": "the SAE",
    "optim": "optimisation",
    "sparsity": "sparsity and dead latents",
    "parallel": "distributed training (torchrun --nproc-per-node P -m sae_fast train ...)",
    "output": "output",
}


# Data options of a training run alone: a command that reads an SAE's latents reads one hook
# point (a transcoder's is the input hook point its cfg.json records; a crosscoder's sources
# and a CLT's layers come from its record).
TRAINING_ONLY = ("hooks", "hook_in", "hook_out", "crosscoder", "model_b", "layers")


def add_config_arguments(
    parser: argparse.ArgumentParser, groups: tuple[str, ...], omit: tuple[str, ...] = ()
) -> None:
    """One --flag per TrainConfig field in groups but those named in omit, with its help
    text and default."""
    sections = {g: parser.add_argument_group(GROUPS[g]) for g in groups}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata["group"]
        if group not in sections or f.name in omit:
            continue
        kind, _ = field_type(f)
        parse = {int: integer, float: decimal}.get(kind, kind)
        flag = flag_of(f.name)
        # None means a derived default, which the help text describes.
        shown = "" if f.default is None else f" (default: {f.default})"
        # argparse %-formats help texts: a literal % must be doubled.
        text = f"{f.metadata['help']}{shown}".replace("%", "%%")
        if kind is bool:
            sections[group].add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            sections[group].add_argument(
                flag, type=parse, default=None, choices=f.metadata["choices"], help=text
            )


def flag_of(name: str) -> str:
    """The flag of an option's name: context_size -> --context-size."""
    return "--" + name.replace("_", "-")


def check_counts(args: argparse.Namespace, *names: str) -> None:
    """Each of args' options names, where given (None: an option without a default left
    out), a positive int; else ConfigError naming its flag."""
    from ..validation import check_int

    for name in names:
        if getattr(args, name) is not None:
            check_int(getattr(args, name), flag_of(name), error=ConfigError)


def given_options(args: argparse.Namespace, groups: tuple[str, ...]) -> dict:
    """The TrainConfig options of groups given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] in groups}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def recorded_data_options(provenance: dict, given: dict) -> dict:
    """The data options an SAE was trained on (its provenance), under those given.

    Warns, on stderr, where a given model or hook point differs from the recorded one: an SAE
    of the same width at another layer evaluates without an error, and wrongly.
    """
    train = provenance.get("train") or {}
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == "data"}
    # Not the text: evaluating on the training text would not be held out (give --text).
    recorded = {k: v for k, v in train.items() if k in names and k != "text" and v is not None}
    if "seed" in train:  # for synthetic data it names the true dictionary
        recorded["seed"] = train["seed"]
    for key in ("model", "hook", "hook_in", "hook_out"):
        if key not in recorded and provenance.get(key):  # another library's record
            recorded[key] = provenance[key]
            recorded.setdefault("source", "model")
    if "source" in given and given["source"] != recorded.get("source"):
        recorded = {}  # another kind of data: nothing recorded applies
    for key in ("model", "hook"):
        if key in given and key in recorded and given[key] != recorded[key]:
            print(
                f"sae-fast: warning: this SAE was trained with {key}={recorded[key]!r}, not "
                f"{given[key]!r}",
                file=sys.stderr,
            )
    return {**recorded, **given}


def check_text(text: str, flag: str) -> None:
    """A documents spec names a file or 'stdlib'; else ConfigError naming flag."""
    if text != "stdlib" and not Path(text).is_file():
        raise ConfigError(f"{flag}: {text} is not a file")


def model_for_sae(args: argparse.Namespace, sae) -> tuple[TrainConfig, object, object, int]:
    """(cfg, model, tokenizer, context size) for a command that runs an SAE through a model:
    --model and --hook, else the SAE's recorded ones, checked against the SAE's width; the
    recorded context size, never longer than the model's positions."""
    from ..sources import load_model
    from ..sources.hooks import probe_hook
    from ..validation import parse_dtype

    given = {k: v for k, v in (("model", args.model), ("hook", args.hook)) if v}
    options = _reading_input(sae, recorded_data_options(sae.provenance, given))
    if not options.get("model") or not options.get("hook"):
        raise ConfigError("--model and --hook: the SAE records none; give them")
    cfg = TrainConfig.from_dict({**options, "source": "model"}, where="the data options")
    dtype = parse_dtype(cfg.model_dtype) if cfg.model_dtype else None
    model, tokenizer = load_model(cfg.model, sae.W_dec.device, dtype)
    width = probe_hook(model, cfg.hook).shape[-1]
    if width != sae.d_in:
        raise ConfigError(
            f"{cfg.hook} of {cfg.model} has width {width}; the SAE's d_in is {sae.d_in}"
        )
    return cfg, model, tokenizer, fit_context(model, cfg.context_size)


def _reading_input(sae, options: dict) -> dict:
    """Data options that read what sae encodes: a transcoder's input hook point alone (its
    latents come from it; a given --hook wins), a single hook point for any SAE."""
    if sae.transcoder:
        options = {**options, "hook": options.get("hook") or options.get("hook_in")}
    dropped = ("hooks", "hook_in", "hook_out", "skip_connection")
    return {k: v for k, v in options.items() if k not in dropped}


def fit_context(model, context_size: int) -> int:
    """The recorded context size, never longer than the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None) or context_size
    return min(context_size, limit)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress: a progress bar, on by default."""
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )


def add_model_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """--model and --hook of a command that runs an SAE through a model (model_for_sae)."""
    parser.add_argument("--model", help=f"transformers model (default: {default})")
    parser.add_argument("--hook", help=f"hook point (default: {default})")


def token_bar(args: argparse.Namespace):
    """A tqdm bar over --tokens tokens (none given: open-ended), shown unless --no-progress."""
    from tqdm.auto import tqdm

    return tqdm(total=args.tokens, unit="tok", disable=not args.progress)


def pages_bar(args: argparse.Namespace, features: int):
    """A tqdm bar over a dashboard's records and pages (2 steps per feature), unless
    --no-progress."""
    from tqdm.auto import tqdm

    return tqdm(total=2 * features, desc="pages", disable=not args.progress)


def add_sae_pass_arguments(parser: argparse.ArgumentParser, tokens_help: str) -> None:
    """--sae, --tokens, --batch-size and --device of a command that runs an SAE over data."""
    parser.add_argument("--sae", required=True, help="SAE folder (sae.safetensors + cfg.json)")
    parser.add_argument("--tokens", type=integer, default=65536, help=tokens_help)
    parser.add_argument("--batch-size", type=integer, default=4096, help="activations per batch")
    parser.add_argument("--device", default="auto", help="device (auto: cuda if available)")
