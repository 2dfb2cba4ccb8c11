"""The layer sweep report of `sae-fast train --hooks` in a real browser (tests/browser.py):
it loads without errors, its table shows layers.json's rows with the best value of each
column shaded, its plot and its links to each run's training curves load.
Screenshot: $SAE_FAST_ARTEFACTS/layers/layers.png (default test-artefacts/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from browser import Browser, require_browser
from model_folders import save_model, write_corpus
from test_multi_hook import train_args

from sae_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("SAE_FAST_ARTEFACTS", REPO / "test-artefacts")) / "layers"


@pytest.fixture(scope="module", autouse=True)
def _chromium():
    require_browser()


def test_layer_sweep_page(tmp_path):
    model = save_model(tmp_path / "gpt")
    text = write_corpus(tmp_path / "train.txt")
    run = tmp_path / "run"
    assert main(train_args(model, text, run, "resid_post.0-1,mlp_out.0")) == 0
    assert main(["layers", str(run), "--text", text, "--tokens", "300", "--ce-windows", "3",
                 "--device", "cpu"]) == 0  # fmt: skip
    rows = json.loads((run / "layers.json").read_text())["rows"]
    with Browser() as b:
        b.open(run / "layers.html")
        assert b.errors == []
        cells = b.eval(
            "[...document.querySelectorAll('#layers tr')].slice(1)"
            ".map(tr => [...tr.cells].map(td => td.textContent))"
        )
        assert [c[0] for c in cells] == [r["hook"] for r in rows]
        head = b.eval("[...document.querySelectorAll('#layers th')].map(th => th.textContent)")
        fvu = head.index("FVU")
        assert [float(c[fvu]) for c in cells] == pytest.approx([r["fvu"] for r in rows], 1e-3)
        shaded = b.eval(
            f"[...document.querySelectorAll('#layers tr td:nth-child({fvu + 1})')]"
            ".map(td => td.classList.contains('best'))"
        )
        low = min(range(len(rows)), key=lambda i: rows[i]["fvu"])
        assert shaded == [i == low for i in range(len(rows))]
        assert b.eval("document.querySelector('img').naturalWidth") > 500
        link = b.eval("document.querySelector('#layers a').href")
        assert link.endswith("/resid_post.0/training_curves.png")
        assert Path(link.removeprefix("file://")).exists()
        b.screenshot(ARTEFACTS / "layers.png")
    assert (ARTEFACTS / "layers.png").stat().st_size > 10_000
