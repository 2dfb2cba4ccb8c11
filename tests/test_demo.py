"""`sae-fast demo` on the packaged all-MiniLM-L6-v2: Ctrl-C, resume, re-running a finished run."""

from __future__ import annotations

import json
import os
import signal

from model_folders import write_corpus

from sae_fast import SparseAutoencoder
from sae_fast.apps import demo
from sae_fast.apps.report import write_run_report
from sae_fast.sources import ModelSource
from sae_fast.training.checkpoints import list_checkpoints
from sae_fast.training.metrics import read_jsonl

SMALL = {"steps": 4, "n_latents": 256, "k": 8, "batch_size": 64, "eval_tokens": 256}


class InterruptedSource(ModelSource):
    """A ModelSource that sends Ctrl-C while the trainer draws its third batch (step 2's)."""

    def next_batch(self, n: int):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return super().next_batch(n)


def test_demo_stops_on_ctrl_c_resumes_and_reports_again(tmp_path, monkeypatch):
    text, out = write_corpus(tmp_path / "corpus.txt"), tmp_path / "demo"

    with monkeypatch.context() as m:
        m.setattr(demo, "ModelSource", InterruptedSource)
        stopped = demo.run_demo(out, text=text, progress=False, **SMALL)
    assert stopped == {"interrupted": True, "steps": 2}
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not (out / "sae").exists() and not (out / "report.html").exists()
    # `sae-fast report` on the stopped demo: its newest checkpoint, its recorded model and text.
    stopped = write_run_report(out, tokens=128, n_features=2, out=tmp_path / "stopped.html")
    stopped = stopped.read_text(encoding="utf-8")
    assert "<th>sae</th><td>checkpoints/step-00000002 (newest checkpoint" in stopped
    assert "<th>step</th><td>2</td>" in stopped and "<th>steps</th><td>4</td>" in stopped
    assert stopped.count("<h3>latent ") == 2 and not (out / "report.html").exists()

    summary = demo.run_demo(out, text=text, progress=False, **SMALL)  # resumes at step 2
    assert summary["steps"] == 4 and summary["train_tokens"] == 4 * 64
    assert summary["d_in"] == 384 and summary["n_latents"] == 256
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["heldout_tokens"] == 256 and summary["heldout_l0"] <= 8
    assert 0 < summary["heldout_fvu"] < 2 and summary["heldout_mse"] > 0
    sae = SparseAutoencoder.load(out / "sae")
    assert (sae.d_in, sae.n_latents, sae.k) == (384, 256, 8)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("<h3>latent ") == 8 and report.count("data:image/png;base64,") == 2
    assert "fires on" in report and "of held-out tokens" in report
    # The report links to the dashboard of every latent over every held-out token.
    assert "<a href='dashboard/index.html'>feature dashboard</a>" in report
    assert report.count("<h3>latent <a href='dashboard/features/") == 8
    assert len(list((out / "dashboard" / "features").glob("*.html"))) == 256
    board = json.loads((out / "dashboard" / "dashboard.json").read_text())
    assert board["tokens_seen"] == summary["dashboard_tokens"] > 0
    assert board["text"] == str(out / "data" / "heldout.jsonl")
    held = (out / "data" / "heldout.jsonl").read_text().splitlines()
    assert len(held) == 4  # every 10th of the 40 paragraphs
    logged = read_jsonl(out / "metrics.jsonl")

    again = demo.run_demo(out, text=text, progress=False, **SMALL)  # finished: re-reports
    assert read_jsonl(out / "metrics.jsonl") == logged  # no more training
    assert {k: v for k, v in again.items() if not k.endswith("seconds")} == {
        k: v for k, v in summary.items() if not k.endswith("seconds")
    }
    assert (out / "report.html").is_file()

    # The same report for the demo's run folder through `sae-fast report`'s function.
    held_path = str(out / "data" / "heldout.jsonl")
    again_report = write_run_report(out, text=held_path, tokens=512, out=tmp_path / "r.html")
    text_again = again_report.read_text(encoding="utf-8")
    assert text_again.count("<h3>latent ") == 8 and "<td>sae/ (final)</td>" in text_again
    assert f"<th>report_text</th><td>{held_path}</td>" in text_again
    assert "<th>step</th><td>4</td>" in text_again and "report-text tokens" in text_again
    assert "href='demo/dashboard/index.html'" in text_again  # relative to the report
