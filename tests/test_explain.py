"""`sae-fast explain`: each token's latents are the SAE's code of that token's activation at
the hook point, summaries come from a reference text, and the HTML view holds the text."""

from __future__ import annotations

import re

import torch
from model_folders import save_model, write_corpus
from models import WIDTH, minilm_tokenizer, tiny_causal_lm

from sae_fast import SparseAutoencoder
from sae_fast.analysis.explain import explain_text
from sae_fast.cli import main
from sae_fast.sources.hooks import run_to_hook

TEXT = "The quick brown fox jumps over the lazy dog, twice."


def test_each_tokens_latents_are_its_code():
    model, tokenizer = tiny_causal_lm()
    torch.manual_seed(0)
    sae = SparseAutoencoder(WIDTH, 64, k=4).eval()
    rows = explain_text(sae, model, tokenizer, "resid_post.0", TEXT, top=3)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    acts = run_to_hook(model, "resid_post.0", input_ids=ids)[0, 1:-1]  # without [CLS], [SEP]
    code = sae.encode(acts)
    tokens = tokenizer.convert_ids_to_tokens(ids[0, 1:-1].tolist())
    assert [r.token for r in rows] == [tokenizer.convert_tokens_to_string([t]) for t in tokens]
    for row, values, indices in zip(rows, code.values, code.indices, strict=True):
        want = [(int(i), v.item()) for v, i in zip(values, indices, strict=True) if v > 0][:3]
        assert [i for i, _ in row.features] == [i for i, _ in want]
        for (_, got), (_, value) in zip(row.features, want, strict=True):
            assert abs(got - value) < 1e-5


def test_the_command_prints_a_row_per_token_with_summaries_and_writes_html(tmp_path, capsys):
    model = save_model(tmp_path / "gpt")
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=20)
    torch.manual_seed(0)
    SparseAutoencoder(WIDTH, 64, k=4).save(tmp_path / "sae")
    page = tmp_path / "explain.html"
    code = main(["explain", "--sae", str(tmp_path / "sae"), "--model", model, "--hook",
                 "resid_post.0", "--contexts", corpus, "--context-tokens", "2000", "--html",
                 str(page), TEXT])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    n_tokens = len(minilm_tokenizer()(TEXT)["input_ids"]) - 2
    assert len(lines) == n_tokens + 1 and lines[-1] == f"wrote {page}"
    assert lines[0].startswith("the ") and "[" in lines[0]  # latent:value [what it fires on]
    body = page.read_text()
    assert body.startswith("<!doctype html>") and "fox" in body and body.count("<tr>") > n_tokens
    # Without a recorded model or hook, they must be given; the widths must agree.
    assert main(["explain", "--sae", str(tmp_path / "sae"), TEXT]) == 2
    assert "--model and --hook" in capsys.readouterr().err
    SparseAutoencoder(16, 64, k=4).save(tmp_path / "narrow")
    code = main(["explain", "--sae", str(tmp_path / "narrow"), "--model", model, "--hook",
                 "resid_post.0", TEXT])  # fmt: skip
    assert code == 2 and "has width 32; the SAE's d_in is 16" in capsys.readouterr().err


def test_the_html_links_each_latent_to_its_dashboard_page(tmp_path, capsys):
    """With --dashboard, a latent the dashboard shows links to its page, relative to the page
    written; the others stay plain numbers."""
    model = save_model(tmp_path / "gpt")
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=20)
    torch.manual_seed(0)
    SparseAutoencoder(WIDTH, 64, k=4).save(tmp_path / "sae")
    model_args = ["--sae", str(tmp_path / "sae"), "--model", model, "--hook", "resid_post.0"]
    board = tmp_path / "board"
    assert main(["dashboard", *model_args, "--text", corpus, "--features", "0-31", "--tokens",
                 "1000", "--out", str(board), "--no-progress"]) == 0  # fmt: skip
    page = tmp_path / "pages" / "explain.html"
    page.parent.mkdir()
    assert main(["explain", *model_args, "--top", "4", "--html", str(page), "--dashboard",
                 str(board), TEXT]) == 0  # fmt: skip
    body = page.read_text()
    linked = {int(i): href for href, i in re.findall(r"<a href='([^']+)'>(\d+)</a>", body)}
    shown = {int(i) for i in re.findall(r"(?:>|\s)(\d+)(?:</a>)?:\d+\.\d\d", body)}
    assert linked and set(linked) == {i for i in shown if i < 32} != shown
    for latent, href in linked.items():
        assert href == f"../board/features/{latent}.html"
        assert (page.parent / href).resolve().is_file()
    capsys.readouterr()
    assert main(["explain", *model_args, "--dashboard", str(board), TEXT]) == 2
    assert "give --html too" in capsys.readouterr().err
    assert main(["explain", *model_args, "--html", str(page), "--dashboard", corpus, TEXT]) == 2
    assert "is not a feature dashboard" in capsys.readouterr().err
