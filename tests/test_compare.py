"""Matching two SAEs' features (sae_fast/analysis/compare.py, correlation.py): the blocked
pass against the dense cosine matrix, the co-firing correlations against the dense Pearson
matrix, a known permutation recovered both ways, and `sae-fast compare` with its pairs."""

from __future__ import annotations

import json

import pytest
import torch
from model_folders import save_model, write_corpus
from models import WIDTH, tiny_causal_lm
from test_cli import synthetic
from test_dashboard import strict_json

from sae_fast import SparseAutoencoder
from sae_fast.analysis.compare import match_decoders, plot_cosines, shared_initialisation
from sae_fast.analysis.correlation import ActivationCorrelation
from sae_fast.analysis.feature_stats import text_batches
from sae_fast.cli import main


def unit(W):
    return W / W.norm(dim=1, keepdim=True)


def test_blocks_give_the_dense_matrix_best_matches():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(50, 8, generator=g), torch.randn(37, 8, generator=g)
    dense = unit(A) @ unit(B).T
    for block in (37 * 3, 37 * 50, 1):  # 3 rows per block, one block, one row per block
        got = match_decoders(A, B, block_elements=block)
        assert torch.equal(got.best_ab, dense.argmax(dim=1))
        assert torch.equal(got.best_ba, dense.argmax(dim=0))
        torch.testing.assert_close(got.cos_ab, dense.max(dim=1).values)
        torch.testing.assert_close(got.cos_ba, dense.max(dim=0).values)
        assigned = got.pair_b[got.pair_b >= 0]
        assert assigned.unique().numel() == assigned.numel()  # one to one


def test_a_permuted_dictionary_is_recovered_and_its_new_rows_are_not():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(64, 32, generator=g)
    perm = torch.randperm(64, generator=g)
    B = torch.cat([A[perm], torch.randn(4, 32, generator=g)])  # 4 rows A lacks
    replaced = perm[:8]  # the A rows at B's first 8 positions: replaced by random ones
    B[:8] = torch.randn(8, 32, generator=g)
    got = match_decoders(A, 3 * B)  # scale does not matter: cosines
    kept = torch.ones(64, dtype=torch.bool)
    kept[replaced] = False
    position = torch.empty(64, dtype=torch.int64)
    position[perm] = torch.arange(64)  # where each A row went in B
    assert torch.equal(got.best_ab[kept], position[kept])
    assert torch.equal(got.pair_b[kept], position[kept])
    torch.testing.assert_close(got.cos_ab[kept], torch.ones(56))
    summary = got.summary(top=3)
    assert summary["shared"]["0.9"]["a_to_b"] == 56 / 64
    assert summary["shared"]["0.9"]["b_to_a"] == 56 / 68
    assert summary["shared"]["0.9"]["one_to_one"] == 56 / 64
    assert all(r["cosine"] == pytest.approx(1.0) and r["mutual"] for r in summary["best"])
    assert summary["worst"][0]["a"] in replaced.tolist()


def test_the_command_writes_the_report_and_the_histogram(tmp_path, capsys):
    torch.manual_seed(0)
    a = SparseAutoencoder(16, 64, k=4)
    b = SparseAutoencoder(16, 96, k=4)
    with torch.no_grad():
        b.W_dec[:64] = a.W_dec.flip(0)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    assert report["n_latents_a"] == 64 and report["n_latents_b"] == 96
    assert report["shared"]["0.9"]["a_to_b"] == 1.0 and report["one_to_one_assigned"] == 64
    assert (out / "cosines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "one_to_one" in printed and "100.0%" in printed
    SparseAutoencoder(8, 16, k=2).save(tmp_path / "narrow")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "narrow")]) == 2
    assert "d_in=16 and 8" in capsys.readouterr().err


def _random_pair(seed: int, m_a: int = 40, m_b: int = 30, activation: str = "topk"):
    torch.manual_seed(seed)
    k = 4 if activation == "topk" else None
    a = SparseAutoencoder(WIDTH, m_a, k=k, activation=activation).eval()
    b = SparseAutoencoder(WIDTH, m_b, k=k, activation=activation).eval()
    if activation == "relu":  # sparse ReLU codes (the tiny model's pre-activations are small)
        with torch.no_grad():
            a.b_enc.fill_(-0.04)
            b.b_enc.fill_(-0.04)
    return a, b


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_correlations_are_the_dense_pearson_matrix_best_matches(tmp_path, activation):
    model, tokenizer = tiny_causal_lm()
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=20)
    a, b = _random_pair(0, activation=activation)
    corr = ActivationCorrelation(a.n_latents, b.n_latents)
    dense_a, dense_b = [], []
    with torch.no_grad():
        for _, acts, _ in text_batches(model, tokenizer, "resid_post.0", corpus, 32,
                                       batch_size=3, max_tokens=1200):  # fmt: skip
            codes = [sae.encode(acts) for sae in (a, b)]
            corr.add(*codes)
            for held, sae, code in ((dense_a, a, codes[0]), (dense_b, b, codes[1])):
                held.append(code.to_dense(sae.n_latents) if activation == "topk" else code)
    za, zb = torch.cat(dense_a).double(), torch.cat(dense_b).double()
    assert corr.n == 1200 == za.shape[0]
    full = torch.corrcoef(torch.cat([za, zb], 1).T)[: a.n_latents, a.n_latents :]
    got = corr.result()
    for best, r, matrix in ((got.best_ab, got.r_ab, full), (got.best_ba, got.r_ba, full.T)):
        fired = ~matrix.isnan().all(1)
        want = torch.nan_to_num(matrix, nan=-2).max(1)
        has = best >= 0
        # A latent that co-fires with none has no match; every one that co-fires has its
        # dense best (a positive correlation: a pair that never co-fires has r <= 0).
        assert (has <= fired).all() and has.sum() > 0.8 * fired.sum()
        torch.testing.assert_close(r[has], want.values[has])
        assert torch.equal(best[has], want.indices[has])
    ia, ib = torch.tensor([0, 3, 7, 7]), torch.tensor([1, 2, 2, 29])
    torch.testing.assert_close(corr.pair_r(ia, ib), full[ia, ib])


def test_the_command_matches_by_correlation_and_shows_pairs_side_by_side(tmp_path, capsys):
    model = save_model(tmp_path / "gpt")
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=30)
    a, _ = _random_pair(1, m_a=48)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(2))
    b = SparseAutoencoder(WIDTH, 48, k=4).eval()  # A's latents permuted: the same code
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(b, name).copy_(getattr(a, name)[perm])
        b.b_dec.copy_(a.b_dec)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    out = tmp_path / "cmp"
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--model", model, "--hook",
            "resid_post.0", "--text", corpus, "--tokens", "1500", "--top", "3",
            "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "activation correlation over 1500 tokens" in printed
    assert "for 100.0% of them it is the best decoder match" in printed
    report = strict_json((out / "compare.json").read_text())
    corr = report["correlation"]
    assert corr["tokens"] == 1500 and corr["shared"]["0.9"]["a_to_b"] > 0.9
    inverse = torch.argsort(perm)
    for pair in report["pairs"]:  # the best and worst decoder matches: all exact here
        assert pair["b"] == inverse[pair["a"]] and pair["correlation"] > 0.999
    page = (out / "pairs.html").read_text()
    assert page.count("<div class='pair'>") == len(report["pairs"]) == 6  # best 3, worst 3
    for pair in report["pairs"]:
        for side, i in (("a", pair["a"]), ("b", pair["b"])):
            assert f"href='{side}/features/{i}.html'" in page
            assert (out / side / "features" / f"{i}.html").is_file()
    # Chosen pairs; bad ones are named.
    assert main([*args, "--out", str(out), "--pairs", "0:5,2:2"]) == 0
    assert json.loads((out / "compare.json").read_text())["pairs"][1]["b"] == 2
    capsys.readouterr()
    for extra, words in ((["--pairs", "0:99"], "--pairs: expected pairs A:B of latents 0..47"),
                         (["--pairs", "x"], "--pairs"), (["--pairs", "\u00b2:1"], "'\u00b2:1'"),
                         (["--pairs", "\u0663:1"], "--pairs"), (["--pairs", "+1:1"], "--pairs"),
                         (["--pairs", "1:-0"], "--pairs")):  # fmt: skip
        assert main([*args, "--out", str(out), *extra]) == 2
        assert words in capsys.readouterr().err
    pair = ["compare", str(tmp_path / "a"), str(tmp_path / "b")]
    assert main([*pair, "--pairs", "0:1", "--model", model]) == 2
    assert "--model, --pairs: only used with --text" in capsys.readouterr().err
    assert main([*args, "--pairs", "0:1"]) == 2
    assert "--pairs: the pairs' dashboards need --out" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main([*pair, "--model", model, "--hook", "resid_post.0", "--text",
                 str(tmp_path / "empty.txt"), "--no-progress"]) == 2  # fmt: skip
    assert "holds no tokens" in capsys.readouterr().err


def test_two_saes_trained_from_one_seed_are_said_to_share_their_start(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main([str(a) for a in synthetic(tmp_path / name, steps=2, seed=seed)]) == 0
    capsys.readouterr()
    saes = {name: str(tmp_path / name / "sae") for name in "abc"}
    assert main(["compare", saes["a"], saes["b"], "--out", str(tmp_path / "ab")]) == 0
    err = capsys.readouterr().err
    assert "warning: the two SAEs started from the same weights" in err and "'seed': 0" in err
    report = json.loads((tmp_path / "ab" / "compare.json").read_text())
    assert report["shared_initialisation"]["seed"] == 0
    assert main(["compare", saes["a"], saes["c"], "--out", str(tmp_path / "ac")]) == 0
    assert "same weights" not in capsys.readouterr().err
    assert "shared_initialisation" not in json.loads((tmp_path / "ac" / "compare.json").read_text())
    # An SAE without a record of its training (another library's) is never said to.
    assert shared_initialisation({}, {"train": {"seed": 0}}, ((16, 32), (16, 32))) is None


def test_the_cosine_histograms_do_not_hide_each_other(tmp_path):
    """Two SAEs that match each other alike give two equal histograms: both colours must
    show, in bars of their own (drawn over each other, the second would cover the first)."""
    from matplotlib import colors, image

    torch.manual_seed(0)
    W = unit(torch.randn(64, 16))
    matches = match_decoders(W, W + 0.05 * torch.randn_like(W))
    matches.cos_ba = matches.cos_ab.clone()
    pixels = image.imread(plot_cosines(matches, tmp_path / "cosines.png"))[..., :3]
    for colour in ("C0", "C1"):
        rgb = torch.tensor(colors.to_rgb(colour))
        near = (torch.from_numpy(pixels) - rgb).abs().amax(-1) < 0.02
        assert near.sum() > 500, colour
