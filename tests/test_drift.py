"""Feature drift: the test and the score against their definitions (and SciPy's BH), then
`sae-fast drift` through a real model on two corpora that differ in a known way (standard-
library docstrings against the prose of Python's licence) and on two halves of one corpus."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from model_folders import save_model, write_corpus
from models import WIDTH

from sae_fast import SparseAutoencoder
from sae_fast.analysis.drift import benjamini_hochberg, feature_drift, js_divergence
from sae_fast.cli import main


def test_bh_matches_scipy_and_a_hand_count():
    stats = pytest.importorskip("scipy.stats")
    p = torch.tensor([0.01, 0.04, 0.03, 0.2], dtype=torch.float64)
    # Sorted 0.01, 0.03, 0.04, 0.2 times 4 / rank: 0.04, 0.06, 0.0533, 0.2; running minimum.
    want = torch.tensor([0.04, 0.16 / 3, 0.16 / 3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(benjamini_hochberg(p), want)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, generator=g, dtype=torch.float64) ** 3
    want = torch.from_numpy(stats.false_discovery_control(p.numpy(), method="bh"))
    torch.testing.assert_close(benjamini_hochberg(p), want)


def test_the_z_test_counts_the_tokens_of_both_corpora():
    freq_a = torch.tensor([0.0, 0.5, 0.2, 0.2], dtype=torch.float64)
    freq_b = torch.tensor([0.1, 0.49, 0.2, 0.1], dtype=torch.float64)
    drift = feature_drift(freq_a, 10_000, freq_b, 1_000)
    pooled = (0.2 * 10_000 + 0.1 * 1_000) / 11_000
    z3 = (0.1 - 0.2) / math.sqrt(pooled * (1 - pooled) * (1 / 10_000 + 1 / 1_000))
    assert drift.z[3].item() == pytest.approx(z3)
    assert drift.z[2] == 0 and drift.moved.tolist() == [True, False, False, True]
    rows = drift.movers(10)
    assert [(r["latent"], r["direction"]) for r in rows] == [(0, "appears"), (3, "vanishes")]
    # The same shift on a tenth of the tokens is not enough for latent 3.
    assert feature_drift(freq_a, 1_000, freq_b, 100).moved.tolist()[3] is False
    same = feature_drift(freq_a, 5_000, freq_a, 5_000)
    assert not same.moved.any() and same.divergence == 0
    with pytest.raises(ValueError, match="alpha"):
        feature_drift(freq_a, 10, freq_b, 10, alpha=0)


def test_js_divergence_is_0_for_equal_shares_and_1_for_disjoint_ones():
    a = torch.tensor([1.0, 3.0, 0.0, 0.0])
    assert js_divergence(a, 2 * a) == 0
    assert js_divergence(a, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert 0 < js_divergence(a, torch.tensor([1.0, 1.0, 1.0, 0.0])) < 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2, a random TopK SAE on its first block, and the corpora."""
    d = tmp_path_factory.mktemp("drift")
    docs = Path(write_corpus(d / "docstrings.txt", paragraphs=200))
    paragraphs = docs.read_text().split("\n\n")
    (d / "half_a.txt").write_text("\n\n".join(paragraphs[0::2]))  # alternate paragraphs:
    (d / "half_b.txt").write_text("\n\n".join(paragraphs[1::2]))  # the same mix of topics
    torch.manual_seed(0)
    SparseAutoencoder(WIDTH, 128, k=4).save(d / "sae")
    return {"dir": d, "model": save_model(d / "gpt"), "docs": str(docs)}


def drift(setup, a: str, b: str, *extra) -> tuple[int, dict]:
    out = setup["dir"] / "report.json"
    out.unlink(missing_ok=True)
    code = main([
        "drift", "--sae", str(setup["dir"] / "sae"), "--model", setup["model"],
        "--hook", "resid_post.0", "--text", a, "--against", b, "--context-size", "32",
        "--shuffle-buffer", "256", "--model-batch-size", "8", "--out", str(out), *extra,
    ])  # fmt: skip
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_docstrings_against_prose_drift_and_two_halves_of_one_corpus_do_not(setup, capsys):
    licence = str(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    board = setup["dir"] / "board"
    code, prose = drift(setup, setup["docs"], licence, "--tokens", "3000", "--dashboard",
                        str(board / "prose"), "--no-progress")  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err  # each text holds the tokens asked for
    halves = setup["dir"] / "half_a.txt", setup["dir"] / "half_b.txt"
    code, same = drift(setup, *map(str, halves), "--tokens", "3000", "--dashboard",
                       str(board / "same"), "--no-progress")  # fmt: skip
    assert code == 0
    # The movers' dashboards: each mover's page on A and on B, side by side.
    page = (board / "prose" / "movers.html").read_text()
    assert prose["dashboard"] == str(board / "prose" / "movers.html")
    assert page.count("<div class='pair'>") == len(prose["top"])
    for row in prose["top"]:
        for side, text in (("a", setup["docs"]), ("b", licence)):
            record = json.loads((board / "prose" / side / "features" / f"{row['latent']}.json")
                                .read_text())  # fmt: skip
            assert record["text"] == text and record["tokens_seen"] == 3000
            assert f"href='{side}/features/{row['latent']}.html'" in page
        assert f"{row['direction']}: fires on" in page
    assert "no pairs to show" in (board / "same" / "movers.html").read_text()
    assert prose["tokens_a"] == prose["tokens_b"] == same["tokens_a"] == 3000
    # Known drift: latents move both ways, and the score is many times the halves'; the
    # halves: no latent moves.
    assert prose["appeared"] + prose["vanished"] >= 4
    assert prose["appeared"] > 0 and prose["vanished"] > 0
    assert same["moved_fraction"] == 0 and same["top"] == []
    assert prose["js_divergence"] > 10 * same["js_divergence"] > 0
    top = prose["top"][0]
    # The table of movers: a header, then the top mover first, its z as in the report.
    lines = printed.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["latent", "direction"])
    first = lines[header + 1].split()
    assert first[:2] == [str(top["latent"]), top["direction"]]
    assert float(first[-1]) == pytest.approx(top["z"], abs=1e-3)
    assert abs(top["z"]) == max(abs(r["z"]) for r in prose["top"])


def test_a_text_shorter_than_the_shuffle_buffer_is_not_read_twice(setup, capsys):
    """The default shuffle buffer (16384 rows) outgrows these texts; --tokens 500 does not."""
    code = main(["drift", "--sae", str(setup["dir"] / "sae"), "--model", setup["model"],
                 "--hook", "resid_post.0", "--text", setup["docs"], "--against", setup["docs"],
                 "--tokens", "500", "--context-size", "32"])  # fmt: skip
    assert code == 0 and "warning" not in capsys.readouterr().err


def test_drift_errors_are_one_line(setup, capsys):
    docs = setup["docs"]
    assert drift(setup, docs, docs, "--alpha", "1.5")[0] == 2
    assert "--alpha must be in (0, 1)" in capsys.readouterr().err
    assert drift(setup, docs, str(setup["dir"] / "missing.txt"))[0] == 2
    assert "--against:" in capsys.readouterr().err  # before any pass over --text
    code = main(["drift", "--sae", str(setup["dir"] / "sae"), "--against", docs])
    assert code == 2 and "--text" in capsys.readouterr().err
