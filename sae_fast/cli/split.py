"""`sae-fast split`: split a text into training and held-out documents."""

from __future__ import annotations

import argparse

from ..options import HELD_OUT, decimal
from .common import SubParser, check_text


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    split = sub(
        "split",
        help="split a text into training and held-out documents",
        description="Write DIR/train.jsonl and DIR/heldout.jsonl from a text's documents, a "
        "--held-out fraction of them held out, spread evenly through the text (0.1: documents "
        "0, 10, 20, ...), for train --text and eval/layers/dashboard --text.",
    )
    split.add_argument("text", help="'stdlib', a .txt or a .jsonl file")
    split.add_argument("--held-out", type=decimal, default=HELD_OUT, help="fraction held out")
    split.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    split.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..sources import split_documents

    check_text(args.text, "text")
    paths = split_documents(args.text, args.out, args.held_out)
    counts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            counts.append(sum(1 for _ in f))
    print(f"wrote {paths[0]} ({counts[0]} documents) and {paths[1]} ({counts[1]} held out)")
    return 0
