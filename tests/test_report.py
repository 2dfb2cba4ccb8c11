"""`sae-fast report RUN`: report.html for real training runs (synthetic, model, cache)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil

import pytest
from model_folders import save_model, write_corpus
from models import minilm_tokenizer

from sae_fast.apps.report import write_run_report
from sae_fast.checkpoint import CheckpointError
from sae_fast.sources import build_source, cache_from_model, load_model
from sae_fast.training import TrainConfig, Trainer
from sae_fast.training.config import ConfigError

SYNTHETIC = {
    "source": "synthetic",
    "synthetic_d": 16,
    "synthetic_features": 32,
    "synthetic_active": 3,
    "n_latents": 64,
    "k": 4,
    "steps": 20,
    "batch_size": 128,
    "init_tokens": 256,
    "lr": 3e-3,
    "lr_warmup_steps": 2,
    "log_every": 5,
    "checkpoint_every": 0,
    "normalize_input": False,  # a checkpoint's SAE then needs no input scale folded in
    "device": "cpu",
    "progress": False,
}
MODEL_RUN = {
    "source": "model",
    "hook": "resid_post.1",
    "context_size": 32,
    "model_batch_size": 8,
    "shuffle_buffer": 256,
    "n_latents": 64,
    "k": 4,
    "steps": 6,
    "batch_size": 64,
    "init_tokens": 128,
    "lr_warmup_steps": 1,
    "log_every": 2,
    "checkpoint_every": 0,
    "device": "cpu",
    "progress": False,
}
RUN_PNGS = ("training_curves.png", "firing_frequency.png")  # as the trainer writes them
OTHER_TEXT = "\n\n".join(
    f"Zebras graze near the volcano while {n} astronomers photograph quasars at midnight."
    for n in ("seven", "eleven", "twenty", "ninety")
)


def train(until: int | None = None, **options) -> TrainConfig:
    cfg = TrainConfig(**options)
    Trainer(cfg, build_source(cfg, "cpu")).train(until)
    return cfg


def images(report: str) -> list[bytes]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    return [base64.b64decode(e) for e in found]


def summary(report: str) -> dict[str, str]:
    rows = re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", report)
    return {html.unescape(k): html.unescape(v) for k, v in rows}


def hits(report: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<span class='hit'>(.*?)</span>", report)]


def card_count(report: str) -> int:
    return len(re.findall(r"<h3>latent \d+</h3>", report))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return save_model(root / "gpt"), write_corpus(root / "corpus.txt")


def test_finished_synthetic_run_embeds_its_plots_and_feature_recovery(tmp_path):
    run = tmp_path / "run"
    train(**SYNTHETIC, out_dir=str(run))
    path = write_run_report(run, tokens=2048)
    assert path == run / "report.html"
    report = path.read_text(encoding="utf-8")

    assert images(report) == [(run / name).read_bytes() for name in RUN_PNGS]
    rows = summary(report)
    assert rows["sae"] == "sae/ (final)" and rows["step"] == "20" and rows["steps"] == "20"
    assert rows["source"] == "synthetic" and rows["n_latents"] == "64" and rows["k"] == "4"
    assert rows["train_tokens"] == str(20 * 128) and rows["heldout_tokens"] == "2048"
    assert 0.5 < float(rows["feature_recovery"]) <= 1.0
    assert float(rows["heldout_l0"]) <= 4
    assert "step 20." in report and card_count(report) == 0 and "<h2>Features" not in report


def test_stopped_run_is_reported_from_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(until=10, **SYNTHETIC, out_dir=str(run))
    assert not (run / "sae").exists() and not (run / "training_curves.png").exists()
    out = tmp_path / "elsewhere" / "stopped.html"
    report = write_run_report(run, tokens=1024, out=out).read_text(encoding="utf-8")

    rows = summary(report)
    assert rows["step"] == "10" and rows["steps"] == "20"
    assert rows["sae"] == "checkpoints/step-00000010 (newest checkpoint: no final SAE yet)"
    assert "step 10 of 20" in report and rows["train_tokens"] == str(10 * 128)
    drawn = images(report)  # curves from metrics.jsonl, histogram from the held-out pass
    assert len(drawn) == 2 and all(png.startswith(b"\x89PNG") for png in drawn)
    assert not (run / "report.html").exists()


def test_model_run_cards_show_contexts_of_the_text(tmp_path, model_folder):
    folder, corpus = model_folder
    run = tmp_path / "run"
    train(**MODEL_RUN, model=folder, text=corpus, out_dir=str(run))
    tokenizer = minilm_tokenizer()

    report = write_run_report(run, tokens=512, n_features=3).read_text(encoding="utf-8")
    rows = summary(report)
    assert rows["source"] == "model" and rows["model"] == folder and rows["step"] == "6"
    assert rows["report_text"] == corpus and 512 <= int(rows["report_tokens"]) < 512 + 32
    assert card_count(report) == 3 and "fires on" in report
    assert "training-text tokens" in report
    with open(corpus) as f:
        spelled = {tokenizer.convert_tokens_to_string([t]) for t in tokenizer.tokenize(f.read())}
    assert hits(report) and set(hits(report)) <= spelled
    assert images(report) == [(run / name).read_bytes() for name in RUN_PNGS]

    other = tmp_path / "other.txt"
    other.write_text(OTHER_TEXT)
    out = tmp_path / "other.html"
    report = write_run_report(run, text=str(other), tokens=40, out=out).read_text("utf-8")
    spelled = {tokenizer.convert_tokens_to_string([t]) for t in tokenizer.tokenize(OTHER_TEXT)}
    assert card_count(report) >= 1 and set(hits(report)) <= spelled
    assert "report-text tokens" in report and summary(report)["report_text"] == str(other)
    assert 40 <= int(summary(report)["report_tokens"]) < 40 + 32


def test_cache_run_loads_the_model_its_cache_records(tmp_path, model_folder):
    folder, corpus = model_folder
    model, tokenizer = load_model(folder)
    cache = cache_from_model(tmp_path / "cache", model, tokenizer, "resid_post.1", corpus, 1024, 32)
    run = tmp_path / "run"
    options = {k: v for k, v in MODEL_RUN.items() if k not in ("source", "hook")}
    train(**options, source="cache", cache_dir=str(cache), out_dir=str(run))

    report = write_run_report(run, tokens=256, n_features=2).read_text(encoding="utf-8")
    rows = summary(report)
    assert rows["source"] == "cache" and rows["model"] == folder and rows["hook"] == "resid_post.1"
    assert rows["report_text"] == corpus and card_count(report) == 2
    assert hits(report)


def test_errors_name_the_folder_and_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="run folder .*nowhere does not exist"):
        write_run_report(tmp_path / "nowhere")
    not_run = tmp_path / "notes"
    not_run.mkdir()
    (not_run / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=f"{not_run} is not a training run.*config.json"):
        write_run_report(not_run)
    (not_run / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        write_run_report(not_run)
    (not_run / "config.json").write_text(json.dumps({"train": {}}))
    with pytest.raises(CheckpointError, match=r"lacks \['source', 'd_in'"):
        write_run_report(not_run)

    run = tmp_path / "run"
    train(**{**SYNTHETIC, "steps": 2}, out_dir=str(run))
    with pytest.raises(ConfigError, match="text: .*synthetic"):
        write_run_report(run, text="stdlib")
    with pytest.raises(ConfigError, match="tokens must be a positive int"):
        write_run_report(run, tokens=0)
    with pytest.raises(ConfigError, match="device must be"):
        write_run_report(run, device="tpu")
    shutil.rmtree(run / "sae")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(CheckpointError, match=f"{run} holds neither a final SAE"):
        write_run_report(run)
