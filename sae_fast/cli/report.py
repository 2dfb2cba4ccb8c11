"""`sae-fast report`: write the demo's report (curves, histogram, feature contexts) for any run."""

from __future__ import annotations

import argparse

from ..options import integer
from ..training.config import check_device
from .common import SubParser


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    report = sub(
        "report",
        help="write the demo's report (curves, histogram, feature contexts) for any run",
        description="Write report.html for a training run folder: its summary, training "
        "curves, the latent firing histogram and the top activating contexts of a few "
        "features, on the run's own model and text (or --text). A run without sae/ yet is "
        "reported from its newest checkpoint.",
    )
    report.add_argument("run", help="run folder (the --out-dir of sae-fast train)")
    report.add_argument("--text", help="text for the contexts (default: the run's own)")
    report.add_argument("--tokens", type=integer, default=32768, help="tokens to read")
    report.add_argument("--features", type=integer, default=8, help="feature cards")
    report.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    report.add_argument("--out", help="the HTML file (default: RUN/report.html)")
    report.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..apps.report import write_run_report

    check_device(args.device, "--device")
    path = write_run_report(
        args.run,
        text=args.text,
        tokens=args.tokens,
        n_features=args.features,
        device=args.device,
        out=args.out,
    )
    print(f"report: {path}")
    return 0
