"""`sae-fast dashboard` in a real browser (headless Chromium over CDP, tests/browser.py).

One dashboard of a 300-latent TopK SAE on the tiny GPT-2: the index loads without errors,
pages 200 rows with a "more" button, sorts by its headers, searches summaries and filters by
density, each against the features/<i>.json records read here, not against the page; a
feature page's top contexts, histogram bars, shaded tokens and links match its record.
Screenshots go to $SAE_FAST_ARTEFACTS/dashboard (default test-artefacts/dashboard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from browser import Browser, require_browser
from model_folders import save_model, write_corpus
from models import WIDTH

from sae_fast import SparseAutoencoder
from sae_fast.analysis.dashboard_html import top_tokens
from sae_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("SAE_FAST_ARTEFACTS", REPO / "test-artefacts")) / "dashboard"
N_LATENTS = 300  # over the index's 200-row page, so "more" has rows to show
MORE_HIDDEN = "document.getElementById('more').hidden"
DEAD = 7


@pytest.fixture(scope="module", autouse=True)
def _chromium():
    require_browser()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """(the dashboard folder, its feature records by index)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    model = save_model(tmp / "gpt")
    corpus = write_corpus(tmp / "corpus.txt", paragraphs=60)
    torch.manual_seed(0)
    sae = SparseAutoencoder(WIDTH, N_LATENTS, k=4)
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4  # a latent that never fires, for its page
    sae.save(tmp / "sae")
    out = tmp / "out"
    code = main(["dashboard", "--sae", str(tmp / "sae"), "--model", model, "--hook",
                 "resid_post.0", "--text", corpus, "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    records = {}
    for path in (out / "features").glob("*.json"):
        record = json.loads(path.read_text())
        records[record["index"]] = record
    assert sorted(records) == list(range(N_LATENTS))
    return out, records


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def shown(b: Browser) -> list[list[str]]:
    """The index table's rows, as cell texts."""
    return b.eval(
        "[...document.querySelectorAll('#features tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))"
    )


def indices(b: Browser) -> list[int]:
    return [int(row[0]) for row in shown(b)]


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_index_sorts_filters_searches_and_pages(dashboard, browser):
    out, records = dashboard
    b = browser
    b.open(out / "index.html")
    assert b.errors == []
    # data.js must carry the records' values: the checks below read the records only.
    data = b.eval("window.SAE_DASHBOARD.features")
    assert [(r[0], r[1], r[4], r[5]) for r in data] == [
        (i, records[i]["density"], records[i]["summary"], top_tokens(records[i]))
        for i in sorted(records)
    ]
    density = {i: r["density"] for i, r in records.items()}
    by_density = sorted(records, key=lambda i: (-density[i], i))
    rows = shown(b)
    count = b.eval("document.getElementById('count').textContent")
    assert len(rows) == 200 and count == f"{N_LATENTS} of {N_LATENTS} features"
    assert [int(r[0]) for r in rows] == by_density[:200]
    percents = [float(r[1].rstrip("%")) for r in rows]
    assert percents == sorted(percents, reverse=True) and percents[0] > percents[-1]
    b.screenshot(ARTEFACTS / "index.png", full_page=True)
    check_png(ARTEFACTS / "index.png")

    b.click("#features th:nth-child(2)")  # density again: ascending
    assert indices(b)[0] == min(records, key=lambda i: (density[i], i))
    b.click("#features th:nth-child(1)")  # feature: by index, ascending
    assert indices(b) == list(range(200))

    # The summary word in the most features short of 200, so every match is on one page;
    # matched as the page does, a substring of the summary or of the top examples' tokens.
    words = {w for r in records.values() for w in r["summary"].lower().split() if w.isalpha()}
    searched = {i: (r["summary"] + " " + top_tokens(r)).lower() for i, r in records.items()}
    matches = {w: {i for i, text in searched.items() if w in text} for w in words}
    word = max((w for w in words if len(matches[w]) < 200), key=lambda w: len(matches[w]))
    b.type("#search", word)
    assert sorted(indices(b)) == sorted(matches[word]) and b.eval(MORE_HIDDEN)
    b.type("#search", "")

    # Bounds between two densities, so float rounding of percent / 100 cannot move a row.
    levels = sorted(set(density.values()))
    lo, hi = ((levels[n] + levels[n + 1]) / 2 for n in (len(levels) // 4, 3 * len(levels) // 4))
    b.type("#dmin", repr(100 * lo))
    b.type("#dmax", repr(100 * hi))
    within = sorted(i for i in records if lo <= density[i] <= hi)
    assert 0 < len(within) < 200 and indices(b) == within
    b.type("#dmin", "")
    b.type("#dmax", "")

    assert len(shown(b)) == 200 and not b.eval(MORE_HIDDEN)
    b.click("#more")
    assert indices(b) == list(range(N_LATENTS)) and b.eval(MORE_HIDDEN)
    assert b.errors == []


@pytest.mark.parametrize("which", ["busiest", "dead"])
def test_a_feature_page_shows_its_record(dashboard, browser, which):
    out, records = dashboard
    if which == "busiest":
        index = max(records, key=lambda i: (records[i]["firings"], -i))
    else:
        index = DEAD
        assert records[DEAD]["firings"] == 0
    record = records[index]
    b = browser
    b.open(out / "features" / f"{index}.html")
    assert b.errors == []

    # The .ctx divs between the "Top activations" heading and the next one.
    top = b.eval(
        "(() => { const found = []; let el = [...document.querySelectorAll('h2')]"
        ".find(h => h.textContent === 'Top activations').nextElementSibling;"
        " for (; el && el.tagName !== 'H2'; el = el.nextElementSibling)"
        " if (el.matches('.ctx')) found.push(el.textContent); return found; })()"
    )
    assert top == [f"{e['value']:.3f}" + "".join(e["tokens"]) for e in record["top_examples"]]

    counts = record["histogram"]["counts"]
    assert b.eval("document.querySelectorAll('svg.bars rect').length") == sum(c > 0 for c in counts)
    assert (b.eval("document.querySelectorAll('svg.bars').length") == 1) == any(counts)

    # Every context (top, then the quantiles') marks its own token alone: the same text at
    # the same offset, since a context often holds the same token more than once.
    examples = record["top_examples"] + [
        e for g in record["quantile_examples"] for e in g["examples"]
    ]
    marked = b.eval(
        "[...document.querySelectorAll('.ctx')].map(d => { let at = 0; const found = [];"
        " for (const n of [...d.childNodes].slice(1)) { if (n.classList?.contains('at'))"
        " found.push([at, n.textContent]); at += n.textContent.length; } return found; })"
    )
    assert marked == [
        [[len("".join(e["tokens"][: e["token_index"]])), e["tokens"][e["token_index"]]]]
        for e in examples
    ]

    hrefs = b.eval("[...document.querySelectorAll('a[href]')].map(a => a.href)")
    assert hrefs
    for href in hrefs:
        assert Path(unquote(urlparse(href).path)).is_file(), href
    if not counts:
        assert "never fired on this text" in b.eval("document.body.textContent")

    shot = b.screenshot(ARTEFACTS / f"feature_{which}.png", full_page=True)
    check_png(shot)


def test_compare_shows_its_pairs_side_by_side(dashboard, browser, tmp_path):
    out, _ = dashboard
    tmp = out.parent
    torch.manual_seed(1)
    SparseAutoencoder(WIDTH, 64, k=4).save(tmp_path / "other")
    board = tmp_path / "cmp"
    code = main(["compare", str(tmp / "sae"), str(tmp_path / "other"), "--model",
                 str(tmp / "gpt"), "--hook", "resid_post.0", "--text", str(tmp / "corpus.txt"),
                 "--tokens", "2000", "--top", "2", "--out", str(board),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    pairs = json.loads((board / "compare.json").read_text())["pairs"]
    b = browser
    b.open(board / "pairs.html")
    assert b.errors == []
    sides = b.eval(
        "[...document.querySelectorAll('.pair')].map(p => [...p.querySelectorAll('.side h3 a')]"
        ".map(a => a.textContent))"
    )
    assert sides == [[str(p["a"]), str(p["b"])] for p in pairs]
    for href in b.eval("[...document.querySelectorAll('a[href]')].map(a => a.href)"):
        assert Path(unquote(urlparse(href).path)).is_file(), href
    check_png(b.screenshot(ARTEFACTS / "compare_pairs.png", full_page=True))
