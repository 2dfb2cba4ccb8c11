"""`sae-fast demo`: train a TopK SAE on all-MiniLM-L6-v2 activations, offline, in minutes."""

from __future__ import annotations

import argparse

from ..options import integer
from .common import SubParser, add_progress_argument


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    demo = sub(
        "demo",
        help="train a TopK SAE on all-MiniLM-L6-v2 activations, offline, in minutes",
        description="Train a TopK SAE on the residual stream of the packaged all-MiniLM-L6-v2 "
        "over Python's standard-library docstrings (or --text), evaluate it on held-out "
        "documents, save it and write report.html with training curves and the contexts "
        "that activate a handful of features most.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--text", default="stdlib", help="'stdlib', a .txt or a .jsonl file")
    demo.add_argument("--steps", type=integer, default=600, help="optimizer steps")
    demo.add_argument("--n-latents", type=integer, default=3072, help="dictionary size")
    demo.add_argument("--k", type=integer, default=32, help="active latents per token")
    demo.add_argument("--hook", default="resid_post.3", help="hook point of MiniLM")
    add_progress_argument(demo)
    demo.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..apps.demo import run_demo

    summary = run_demo(
        args.out,
        text=args.text,
        steps=args.steps,
        n_latents=args.n_latents,
        k=args.k,
        hook=args.hook,
        progress=args.progress,
    )
    return 130 if summary.get("interrupted") else 0
