"""`sae-fast toy`: reproduce the L1 and TopK sparsity trade-offs on the seed toy data."""

from __future__ import annotations

import argparse

from ..options import integer
from .common import SubParser


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    toy = sub(
        "toy",
        help="reproduce the L1 and TopK sparsity trade-offs on the seed toy data",
        description="On the toy data (d=10, 24 true features, 3 active, noise 0.02): ReLU+L1 "
        "for rising L1 coefficients and TopK for k = 1..8; writes toy.json and the MSE vs L0 "
        "frontier as toy_frontier.png.",
    )
    toy.add_argument("--out", default="runs/toy", help="output folder")
    toy.add_argument("--steps", type=integer, default=1000, help="optimizer steps per SAE")
    toy.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..apps.toy import run_toy

    run_toy(args.out, steps=args.steps)
    return 0
