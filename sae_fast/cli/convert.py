"""`sae-fast convert`: convert an SAE checkpoint between formats."""

from __future__ import annotations

import argparse

from .common import SubParser


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    convert = sub(
        "convert",
        help="convert an SAE checkpoint between formats",
        description="Load an SAE in any format sae_fast reads (detected) and write it in "
        "another: sae_fast, saelens, sparsify, ...",
    )
    convert.add_argument("src", help="checkpoint to read (folder or file)")
    convert.add_argument("dst", help="where to write")
    convert.add_argument("--to", required=True, help="format to write")
    convert.add_argument("--from", dest="source_format", help="format of src (default: detect)")
    convert.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..sae import SparseAutoencoder

    sae = SparseAutoencoder.load(args.src, format=args.source_format)
    sae.save(args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to}) from {args.src}")
    return 0
