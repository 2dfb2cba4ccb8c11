"""`sae-fast inspect`: print an SAE checkpoint's format, shapes, dtype, architecture and norms."""

from __future__ import annotations

import argparse
import json

from .common import SubParser


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    inspect = sub(
        "inspect",
        help="print an SAE checkpoint's format, shapes, dtype, architecture and norms",
    )
    inspect.add_argument("path", help="checkpoint folder or file")
    inspect.add_argument("--format", help="format of path (default: detect)")
    inspect.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .. import formats
    from ..analysis.summary import summarize
    from ..sae import SparseAutoencoder

    fmt = args.format or formats.detect(args.path)
    sae = SparseAutoencoder.load(args.path, format=fmt)
    print(json.dumps({"path": str(args.path), "format": fmt, **summarize(sae)}, indent=2))
    return 0
