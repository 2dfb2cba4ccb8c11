"""The documentation: every Python example of its pages runs as written, the README and the
pages link only to what exists, and the site builds without a warning (mkdocs --strict)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def run_examples(page: Path) -> list[dict]:
    """The scopes of page's ```python blocks, each run in a fresh namespace."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page} has no python example"
    scopes = []
    for block in blocks:
        scopes.append({})
        exec(compile(block, str(page), "exec"), scopes[-1])
    return scopes


def test_getting_started_and_the_formats_page_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (use,) = run_examples(DOCS / "index.md")
    assert (tmp_path / "my_sae" / "cfg.json").is_file()
    assert use["x_hat"].shape == (512, 768)
    (foreign,) = run_examples(DOCS / "formats.md")
    assert (tmp_path / "sparsify_folder" / "sae.safetensors").is_file()
    assert foreign["back"].activation == "topk"


def test_the_training_example_recovers_the_true_dictionary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (training,) = run_examples(DOCS / "training.md")
    assert (tmp_path / "runs" / "synthetic" / "sae" / "cfg.json").is_file()
    assert training["recovery"] > 0.9


def test_the_steering_examples_on_gpt2_and_minilm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gpt2, minilm = run_examples(DOCS / "steering.md")
    assert gpt2["latents"].shape == (1, 5, 512)
    assert gpt2["steered"].shape == (1, 10)  # 5 prompt + 5 generated tokens
    assert not torch.allclose(gpt2["spliced"], gpt2["clean"])  # a random SAE's x_hat
    assert torch.allclose(minilm["same"], minilm["clean"], atol=1e-5)  # add_error: exact
    assert minilm["latents"].shape[::2] == (2, 3072)
    assert (minilm["moved"] > 1e-4).all()  # the clamp moved both sentences' embeddings


def _links(page: Path) -> list[str]:
    """The relative targets of page's markdown links (no URLs, no in-page anchors)."""
    found = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    return [t for t in found if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_every_link_names_a_file_that_exists(page):
    path = REPO / page if page == "README.md" else DOCS / page
    missing = [t for t in _links(path) if not (path.parent / t).exists()]
    assert not missing, missing


def test_the_readme_fits_on_a_few_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_the_site_builds_strictly(tmp_path):
    """Every page in the nav, every link and anchor resolved, the API reference read from
    the docstrings: a warning fails the build."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("SparseAutoencoder", "encode_topk_auxk", "TrainConfig", "sharded_encode_topk"):
        assert name in api, name
    pages = {p.parent.name for p in tmp_path.glob("*/index.html")}
    assert pages >= {"training", "reading", "steering", "distributed", "formats", "api"}
