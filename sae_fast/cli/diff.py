"""`sae-fast diff`: model diffing with a crosscoder, by each latent's decoder norm per source."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..options import integer
from ..training.config import ConfigError
from .common import SubParser
from .summary import add_json_argument


def _share(text: str) -> float:
    """--specific's value: a share in (0.5, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.5 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0.5, 1], got {text!r}")
    return value


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    diff = sub(
        "diff",
        help="model diffing with a crosscoder: the latents specific to each model or hook point",
        description="Each latent's share of its decoder norm per source (model, or hook "
        "point) of a crosscoder trained with `sae-fast train --crosscoder`: the latents "
        "specific to each source, the shared ones, the relative-norm histogram and the most "
        "specific latents of each.",
    )
    diff.add_argument("sae", help="crosscoder folder (a run's sae/)")
    diff.add_argument("--top", type=integer, default=20, help="latents to list per source")
    diff.add_argument(
        "--specific",
        type=_share,
        default=0.9,
        help="a latent belongs to one source when that source holds this share of its decoder norm",
    )
    diff.add_argument("--out", help="folder for diff.json, diff.md and relative_norms.png")
    add_json_argument(diff)
    diff.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.model_diff import (
        NotACrosscoderError,
        diff_report,
        plot_relative_norms,
        report_markdown,
    )
    from ..files import atomic_path
    from ..sae import SparseAutoencoder

    if args.top < 1:
        raise ConfigError(f"--top must be a positive integer, got {args.top}")
    sae = SparseAutoencoder.load(args.sae)
    try:
        report = diff_report(sae, args.top, args.specific)
    except NotACrosscoderError as e:
        raise ConfigError(f"{args.sae} is not a crosscoder: {e}") from None
    text = report_markdown(report)
    print(json.dumps(report, indent=2) if args.json else text, end="" if not args.json else "\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "diff.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        with atomic_path(out / "diff.md") as tmp:
            tmp.write_text(text)
        plot_relative_norms(report, out / "relative_norms.png")
        if not args.json:
            print(f"wrote diff.json, diff.md, relative_norms.png in {out}")
    return 0
