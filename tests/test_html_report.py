"""The single-file HTML report: embedded images, escaped text."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

from sae_fast.analysis.html_report import FeatureCard, write_report

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # only embedded, never decoded


def test_report_stands_alone_and_escapes_text(tmp_path):
    image = tmp_path / "curves.png"
    image.write_bytes(PNG)
    card = FeatureCard(
        latent=17,
        frequency=0.0125,
        contexts=[(2.5, "x = <script>alert(1)</script>", "&amp;", "café 日本")],
    )
    summary = {"fvu": 0.123456789, "steps": 40, "<b>key</b>": 'a "quoted" <i>value</i>'}
    path = write_report(tmp_path / "report.html", "run <1>", summary, [image], [card])
    assert path == tmp_path / "report.html"
    text = path.read_bytes().decode("utf-8")  # as its meta charset says

    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert "<meta charset='utf-8'>" in text
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [base64.b64decode(e) for e in embedded] == [PNG]
    assert not re.search(r"(src|href)=[\"'](?!data:)", text)  # nothing to fetch

    assert "<script" not in text and "<b>key" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<span class='hit'>&amp;amp;</span>" in text
    assert "café 日本" in text
    assert "<title>run &lt;1&gt;</title>" in text
    assert "<td>0.1235</td>" in text and "<td>40</td>" in text
    assert "<h3>latent 17</h3>" in text and "fires on 1.25% of held-out tokens" in text
    assert "<td>2.500</td>" in text


def test_report_without_images_or_cards(tmp_path):
    text = write_report(tmp_path / "r.html", "empty", {}, [], []).read_text(encoding="utf-8")
    assert "<img" not in text and "<h3>" not in text and "<h1>empty</h1>" in text


def test_report_is_utf8_under_an_ascii_locale(tmp_path):
    """The file says charset utf-8, so it is written as UTF-8 whatever the locale."""
    script = (  # ASCII only: the command line is decoded in the locale too
        "import sys; from sae_fast.analysis.html_report import FeatureCard, write_report; "
        "write_report(sys.argv[1], 'na\\u00efve', {}, [], "
        "[FeatureCard(1, 0.5, [(1.0, '\\u00e9', '\\u00fc', '')])])"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    path = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "<h1>naïve</h1>" in path.read_bytes().decode("utf-8")


def test_report_names_its_corpus_and_shows_notes(tmp_path):
    card = FeatureCard(3, 0.5, [(1.0, "left", "tok", "right")])
    notes = ["SAE: checkpoints/step-00000002 <not final>", "second note"]
    path = write_report(
        tmp_path / "r.html", "t", {}, [], [card], corpus="training-text tokens", notes=notes
    )
    text = path.read_text(encoding="utf-8")
    assert "<h2>Features: the training-text tokens that activate them most</h2>" in text
    assert "fires on 50.00% of training-text tokens" in text and "held-out" not in text
    assert "<p>SAE: checkpoints/step-00000002 &lt;not final&gt;</p>" in text
    assert text.index("second note") < text.index("<h2>Summary</h2>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left beside it
    without_cards = write_report(tmp_path / "r.html", "t", {}, [], []).read_text("utf-8")
    assert "<h2>Features" not in without_cards
