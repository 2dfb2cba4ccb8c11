"""Text corpora: stdlib docstrings, .txt/.md and .jsonl files."""

from __future__ import annotations

import ast
import json
import warnings
from itertools import islice
from pathlib import Path

import pytest
import torch
from model_folders import save_model, write_corpus
from models import WIDTH

from sae_fast import SparseAutoencoder
from sae_fast.cli import main
from sae_fast.sources import (
    SourceError,
    documents,
    split_documents,
    stdlib_docstrings,
    text_file,
)
from sae_fast.sources import text as text_module


def test_stdlib_docstrings_are_parsed_in_sorted_order():
    first = list(islice(stdlib_docstrings(), 40))
    assert first == list(islice(stdlib_docstrings(), 40))
    assert all(isinstance(d, str) and len(d) >= 100 for d in first)
    # __future__.py sorts first; its module docstring leads.
    source = (Path(ast.__file__).parent / "__future__.py").read_text()
    assert first[0] == ast.get_docstring(ast.parse(source))
    assert all(len(d) >= 400 for d in islice(stdlib_docstrings(min_chars=400), 20))


def test_stdlib_docstrings_skip_tests_idle_and_packages(tmp_path, monkeypatch):
    files = {
        "b.py": '"""Module b, long enough."""\ndef f():\n    """Function f, long enough."""\n',
        "a/__init__.py": '"""Package a, long enough."""\nclass C:\n    """Class C, long."""\n',
        "bad.py": '"""never seen"""\nprint "python 2"\n',
        "test/test_x.py": '"""a test suite docstring"""\n',
        "a/tests/helpers.py": '"""a test helper docstring"""\n',
        "a/test_y.py": '"""a test module docstring"""\n',
        "idlelib/editor.py": '"""the IDE, not library docs"""\n',
        "site-packages/pkg.py": '"""a third-party package"""\n',
        "short.py": '"""tiny"""\n',
    }
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    monkeypatch.setattr(text_module.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert list(stdlib_docstrings(min_chars=10)) == [
        "Package a, long enough.",
        "Class C, long.",
        "Module b, long enough.",
        "Function f, long enough.",
    ]


def test_text_file_splits_at_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsame doc\n\n\n  \nsecond\n\nthird\n  indented\n")
    assert list(text_file(path)) == ["first line\nsame doc", "second", "third\n  indented"]
    assert list(documents(str(path))) == list(text_file(path))


def test_text_file_reads_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "one\n\ntwo", "id": 1}, {"text": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(text_file(path)) == ["one\n\ntwo", "three"]


@pytest.mark.parametrize(
    ("line", "match"), [('{"txt": "x"}', r'2 has no string "text"'), ("{oops", "2 is not valid")]
)
def test_text_file_bad_jsonl_names_the_line(tmp_path, line, match):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SourceError, match=match):
        list(text_file(path))


def test_text_file_errors_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="missing.txt does not exist"):
        text_file(tmp_path / "missing.txt")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(SourceError, match=r"data.parquet must end in .jsonl"):
        text_file(tmp_path / "data.parquet")
    with pytest.raises(SourceError, match="nope.jsonl does not exist"):
        documents(str(tmp_path / "nope.jsonl"))


def test_documents_stdlib():
    assert next(documents("stdlib")) == next(stdlib_docstrings())


HOSTILE = {  # name: (bytes, the documents read, whether a warning names the first bad line)
    "latin1.txt": (
        "café au lait\n\nnaïve\n".encode("latin-1"),
        ["caf\ufffd au lait", "na\ufffdve"],
        1,
    ),
    "truncated.txt": (b"ok\n\nends mid-character \xe2\x82", ["ok", "ends mid-character \ufffd"], 3),
    "surrogate.txt": (b"a\xed\xa0\x80b\n", ["a\ufffdb"], 1),  # UTF-8 forbids encoded surrogates
    "overlong.md": (b"x \xc0\xaf y\n", ["x \ufffd y"], 1),
    "bad.jsonl": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', ["fine", "caf\ufffd"], 2),
    "escaped.jsonl": (b'{"text": "lone \\udc80 escape"}\n', ["lone \ufffd escape"], None),
    "good.txt": ("ünïcödé ✓ \ufffd kept\n".encode(), ["ünïcödé ✓ \ufffd kept"], None),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_text_that_is_not_utf8_reads_as_replacement_characters_with_one_warning(tmp_path, name):
    data, want, line = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(text_file(path)) == want
    said = [str(w.message) for w in caught]
    if line is None:
        assert said == []
    else:
        assert said == [said[0]] and f"{name}:{line} is not UTF-8" in said[0]


@pytest.mark.parametrize("data", [b"text\n\x00\x01\x02binary\n", b'{"text": "a"}\n\x00\n'])
def test_a_nul_byte_is_refused_by_file_and_line(tmp_path, data):
    path = tmp_path / ("binary.jsonl" if data.startswith(b"{") else "binary.txt")
    path.write_bytes(data)
    with pytest.raises(SourceError, match=rf"{path.name}:2 holds a NUL byte: a binary file"):
        list(text_file(path))


def test_every_command_that_reads_text_takes_latin1_and_refuses_binary(tmp_path, capsys):
    """The one rule of sources/text.py, through each command that reads a text: a latin-1
    file reads with one warning naming it; a binary one is one line and exit 2."""
    model = save_model(tmp_path / "gpt")
    torch.manual_seed(0)
    SparseAutoencoder(WIDTH, 40, k=4).save(tmp_path / "sae")
    good = write_corpus(tmp_path / "good.txt", paragraphs=6)
    latin1, binary = tmp_path / "latin1.txt", tmp_path / "binary.txt"
    latin1.write_bytes(Path(good).read_text().replace("e", "\xe9").encode("latin-1"))
    binary.write_bytes(b"a line\n\x00\x89PNG\r\n")
    sae, ctx = str(tmp_path / "sae"), ["--context-size", "16"]
    hook = ["--model", model, "--hook", "resid_post.0"]
    commands = {
        "eval": lambda t: ["eval", "--sae", sae, *hook, *ctx, "--text", t, "--tokens", "64",
                           "--device", "cpu"],
        "drift": lambda t: ["drift", "--sae", sae, *hook, *ctx, "--text", good, "--against", t,
                            "--tokens", "64", "--device", "cpu"],
        "compare": lambda t: ["compare", sae, sae, *hook, "--text", t, "--tokens", "64",
                              "--no-progress"],
        "explain": lambda t: ["explain", "some text", "--sae", sae, *hook, "--contexts", t,
                              "--context-tokens", "64", "--device", "cpu"],
        "cache": lambda t: ["cache", *hook, *ctx, "--text", t, "--tokens", "64", "--out",
                            str(tmp_path / f"cache-{Path(t).stem}")],
        "train": lambda t: ["train", *hook, *ctx, "--text", t, "--steps", "1", "--batch-size", "16",
                            "--init-tokens", "16", "--n-latents", "16",
                            "--k", "2", "--out-dir", str(tmp_path / f"run-{Path(t).stem}"),
                            "--no-progress", "--no-plots", "--device", "cpu"],
    }  # fmt: skip
    for name, argv in commands.items():
        with pytest.warns(UserWarning, match=r"latin1.txt:1 is not UTF-8"):
            assert main(argv(str(latin1))) == 0, name
        capsys.readouterr()
        assert main(argv(str(binary))) == 2, name
        err = capsys.readouterr().err
        assert "binary.txt:2 holds a NUL byte" in err and "Traceback" not in err, name


def test_a_split_holds_out_an_even_share_of_the_documents(tmp_path, capsys):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"document {i}" for i in range(40)) + "\n")
    train, held = split_documents(path, tmp_path / "tenth")  # the demo's: 0, 10, 20, 30
    read = [[json.loads(line)["text"] for line in p.open()] for p in (train, held)]
    assert read[1] == [f"document {i}" for i in (0, 10, 20, 30)]
    assert read[0] == [f"document {i}" for i in range(40) if i % 10]
    assert main(["split", str(path), "--held-out", "0.25", "--out", str(tmp_path / "q")]) == 0
    assert "(30 documents)" in capsys.readouterr().out
    held = [json.loads(line)["text"] for line in (tmp_path / "q" / "heldout.jsonl").open()]
    assert held == [f"document {i}" for i in range(0, 40, 4)]
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    for bad, words in (([path, "--held-out", "1"], "held_out must be a fraction in (0, 1)"),
                       ([one], "has 1 documents: too few to hold 0.1 of them out"),
                       ([path, "--held-out", "\u00b2"], "invalid decimal value")):  # fmt: skip
        try:
            code = main(["split", *map(str, bad), "--out", str(tmp_path / "bad")])
        except SystemExit as e:  # argparse's refusal of the value's type
            code = e.code
        assert code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "bad" / "train.jsonl").exists()
