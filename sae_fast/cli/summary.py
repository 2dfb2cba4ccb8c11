"""The table a command prints at its end for a person; --json prints the same results as JSON
for a script (and the command's files hold them too)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

# The columns of one row per SAE (a multi-hook run): what says whether it trained well.
RUN_COLUMNS = ("step", "tokens", "loss", "mse", "fvu", "l0", "dead_fraction", "dense_fraction")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """--json: the results as JSON on stdout instead of the table."""
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )


def cell(value: object) -> str:
    """A value as a table shows it: floats to 4 significant digits, counts with separators."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.4g}"


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """rows as aligned text: a header of the column names, then a line per row; numbers are
    right-aligned, text left."""
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(c), (int, float)) for row in rows if row.get(c) is not None)
        for c in columns
    ]
    out = []
    for line in [list(columns), *cells]:
        parts = [
            text.rjust(w) if right else text.ljust(w)
            for text, w, right in zip(line, widths, numeric, strict=True)
        ]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def scalars(result: dict) -> dict:
    """The numbers and words of result (not its lists and tables)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None}


def metric_table(result: dict) -> str:
    """One result's scalars as a metric | value table."""
    rows = [{"metric": k, "value": v} for k, v in scalars(result).items()]
    return table(rows, ("metric", "value"))


def show(args: argparse.Namespace, results: object, text: str) -> None:
    """Print results as JSON with --json, else the table text."""
    print(json.dumps(results, indent=2) if args.json else text)
