"""Matching two SAEs' features (sae_fast/analysis/compare.py): the blocked pass against the
dense cosine matrix, a known permutation recovered, and `sae-fast compare`."""

from __future__ import annotations

import json

import pytest
import torch

from sae_fast import SparseAutoencoder
from sae_fast.analysis.compare import match_decoders
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
