"""The `sae-fast` command: train, cache, eval, drift, compare, explain, dashboard, report,
layers, demo, toy, convert and inspect.

Errors a user can fix (bad options, missing or damaged files, a folder in use, a hook point
the model lacks, widths that disagree) print one line and exit with code 2; training that
diverges exits with 1; Ctrl-C during training saves a checkpoint and exits with 130
(elsewhere it just exits with 130). The parser needs no torch: `--help` answers at once, and
each command imports what it runs.

One module per command (its options, its run); common.py holds what they share, main.py
the parser and the dispatch.
"""

from .common import recorded_data_options
from .main import build_parser, main

__all__ = ["build_parser", "main", "recorded_data_options"]
