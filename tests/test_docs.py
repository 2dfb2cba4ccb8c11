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
from integrations import require

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


def test_the_clt_page_saves_for_circuit_tracer_and_calibrates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, calibration = run_examples(DOCS / "clt.md")
    assert module["out"].y_hat.shape == (6, 128, 384)
    assert module["back"].activation == "jumprelu"
    assert (tmp_path / "my_clt" / "W_dec_5.safetensors").is_file()
    assert calibration["jump"].activation == "jumprelu"
    assert (tmp_path / "my_clt_for_circuit_tracer" / "config.yaml").is_file()


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


@pytest.mark.usefixtures("signal_handlers_kept")
def test_the_saelens_page_trains_through_saelenss_runner(tmp_path, monkeypatch):
    require("sae_lens", load=False)
    monkeypatch.chdir(tmp_path)
    runner, hooked = run_examples(DOCS / "saelens.md")
    assert type(runner["trained"]).__name__ == "FastTopKTrainingSAE"
    assert type(runner["plain"]).__name__ == "TopKSAE"
    assert hooked["logits"].shape == (2, 16, 100)


def test_the_sparsify_page_trains_through_sparsifys_trainer(tmp_path, monkeypatch):
    sparsify_trainer = require("sparsify.trainer")
    monkeypatch.chdir(tmp_path)
    # The page patches sparsify for good (use_in_trainer()) and sets an env var: undo both.
    monkeypatch.setattr(sparsify_trainer, "SparseCoder", sparsify_trainer.SparseCoder)
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    (page,) = run_examples(DOCS / "sparsify.md")
    assert (tmp_path / "sparsify_out" / "run" / "h.0" / "sae.safetensors").is_file()
    assert type(page["fast"]).__name__ == "FastSparseCoder"


def test_the_transformer_lens_page_splices_steers_and_reads(tmp_path, monkeypatch):
    require("transformer_lens", load=False)
    (page,) = run_examples(DOCS / "transformer_lens.md")
    assert page["values"].shape == page["indices"].shape == (2, 12, 8)
    assert not torch.allclose(page["spliced"], page["clean"])
    assert not torch.allclose(page["steered"], page["clean"])
    assert page["replaced"].shape == page["clean"].shape


def test_the_nnsight_page_runs_as_a_script(tmp_path):
    """nnsight finds a trace by its source file, and patches every object on import: the
    page's example runs as a file, in a Python of its own."""
    require("nnsight", load=False)
    (block,) = re.findall(r"```python\n(.*?)```", (DOCS / "nnsight.md").read_text(), flags=re.S)
    script = tmp_path / "nnsight_page.py"
    script.write_text(block + "\nassert values.shape == (2, 12, 8)\nprint(replaced.shape)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "torch.Size([2, 12, 100])"


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
