"""Text corpora as deterministic streams of documents (str) for the model sources."""

from __future__ import annotations

import ast
import json
import math
import re
import sysconfig
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

from ..files import atomic_path
from ..options import HELD_OUT
from .base import SourceError

STDLIB = "stdlib"
# Folders of the standard library that hold no library docs: test suites, the IDE, installed
# third-party packages, compiled modules, demos and bundled wheels.
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "ensurepip",
        "idle_test",
        "idlelib",
        "lib-dynload",
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
TEXT_SUFFIXES = (".txt", ".md")
TRAIN_FILE, HELD_OUT_FILE = "train.jsonl", "heldout.jsonl"  # a split's (split_documents)
# Lone surrogates: what the surrogateescape handler makes of bytes that are not UTF-8, and what
# a JSON escape such as "\udc80" gives; no valid UTF-8 text holds them, and tokenizers fail on
# them.
_UNDECODABLE = re.compile("[\ud800-\udfff]+")


def _stdlib_files(folder: Path) -> Iterator[Path]:
    """The library's .py files under folder in sorted path order, skipped folders unvisited."""
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if entry.name not in _SKIP_DIRS and not entry.name.startswith("config-"):
                yield from _stdlib_files(entry)
        elif entry.suffix == ".py" and not entry.name.startswith("test_"):
            yield entry


def stdlib_docstrings(min_chars: int = 100) -> Iterator[str]:
    """Docstrings of the running Python's standard library, in a fixed order.

    Files are parsed with ast (never imported) in sorted path order; test suites, idlelib and
    site-packages are skipped; docstrings shorter than min_chars are dropped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # a few files are deliberately invalid (grammar samples)
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def text_file(path: str | Path) -> Iterator[str]:
    """Documents of a .txt/.md file (split at blank lines) or a .jsonl file ("text" per line).

    The file is read lazily, line by line, so it may be larger than memory.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"text file {path} does not exist")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    if path.suffix in TEXT_SUFFIXES:
        return _paragraphs(path)
    raise SourceError(
        f"text file {path} must end in .jsonl or one of {TEXT_SUFFIXES}, not {path.suffix!r}"
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, the one rule for every reader of text: UTF-8,
    where bytes that are not UTF-8 (latin-1, a damaged file) read as U+FFFD with one warning
    naming the first such line, and a NUL byte (a binary file) is refused by line."""
    warned = False
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            if "\0" in line:
                raise SourceError(
                    f"{path}:{number} holds a NUL byte: a binary file, not text (give UTF-8 "
                    f"text in a .txt, .md or .jsonl file)"
                )
            if _UNDECODABLE.search(line):
                if not warned:
                    warnings.warn(
                        f"{path}:{number} is not UTF-8: its undecodable bytes (and any later "
                        "ones) are read as U+FFFD; convert the file to UTF-8 (e.g. iconv -f "
                        "latin1 -t utf-8) to keep them",
                        stacklevel=2,
                    )
                    warned = True
                line = _UNDECODABLE.sub("\ufffd", line)
            yield number, line


def _paragraphs(path: Path) -> Iterator[str]:
    lines: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).strip()
            lines = []
    if lines:
        yield "".join(lines).strip()


def _jsonl_documents(path: Path) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{number} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SourceError(f'{path}:{number} has no string "text" field')
        yield _UNDECODABLE.sub("\ufffd", record["text"])


def documents(spec: str | Path) -> Iterator[str]:
    """The documents named by spec: "stdlib" for stdlib_docstrings(), else a text file path."""
    return stdlib_docstrings() if str(spec) == STDLIB else text_file(spec)


def split_documents(
    spec: str | Path, folder: str | Path, held_out: float = HELD_OUT
) -> tuple[Path, Path]:
    """Write the documents of spec as train.jsonl and heldout.jsonl in folder (made if need
    be), a held_out fraction of them held out, spread evenly: document i is held out when
    floor(i f) steps up (f = 0.1: documents 0, 10, 20, ...). Each file appears whole
    (files.atomic_path), so a run still training on an older split keeps reading the files
    it opened."""
    fraction = Fraction(str(held_out))
    if not 0 < fraction < 1:
        raise SourceError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, held = folder / TRAIN_FILE, folder / HELD_OUT_FILE
    counts = [0, 0]
    with (
        atomic_path(train) as t_path,
        atomic_path(held) as h_path,
        open(t_path, "w", encoding="utf-8") as t,
        open(h_path, "w", encoding="utf-8") as h,
    ):
        for i, doc in enumerate(documents(spec)):
            out = math.floor(i * fraction) > math.floor((i - 1) * fraction)
            (h if out else t).write(json.dumps({"text": doc}) + "\n")
            counts[out] += 1
        if not all(counts):  # inside: neither file is written
            raise SourceError(
                f"{spec} has {sum(counts)} documents: too few to hold {held_out} of them out"
            )
    return train, held
