"""Feature dashboards: the collected activations, the latents picked and their contexts."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from model_folders import write_corpus
from models import WIDTH, minilm_tokenizer, tiny_bert

from sae_fast import SparseAutoencoder
from sae_fast.analysis.features import collect_activations, context, pick_features
from sae_fast.sources import model_activations, token_windows
from sae_fast.sources.text import documents

HOOK = "resid_post.1"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt", paragraphs=8)


def sae_for(activation: str) -> SparseAutoencoder:
    torch.manual_seed(1)
    k = 5 if activation == "topk" else None
    sae = SparseAutoencoder(WIDTH, 64, k=k, activation=activation)
    with torch.no_grad():
        sae.b_enc[:4] = -1e3  # latents 0-3 never fire
    return sae


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_collected_entries_are_the_saes_codes(corpus, activation):
    model, tokenizer = tiny_bert()
    sae = sae_for(activation)
    acts = collect_activations(sae, model, tokenizer, HOOK, corpus, 16, max_windows=9, batch_size=4)

    windows = islice(token_windows(tokenizer, documents(corpus), 16), 9)
    rows = list(model_activations(model, tokenizer, HOOK, windows, batch_size=4))
    assert acts.windows == [ids.tolist() for ids, _ in rows]
    assert acts.n_tokens == sum(len(ids) for ids, _ in rows) > 0
    n = len(acts.value)
    assert all(len(t) == n for t in (acts.latent, acts.window, acts.position)) and n > 0
    for w, (_, x) in enumerate(rows):
        code = sae.encode(x)
        want = code.to_dense(64) if activation == "topk" else code
        got = torch.zeros_like(want)
        mine = acts.window == w
        got[acts.position[mine], acts.latent[mine]] = acts.value[mine]
        torch.testing.assert_close(got, want.clamp_min(0))
    assert (acts.value > 0).all()

    freq = acts.frequencies(64)
    assert freq.sum().item() * acts.n_tokens == pytest.approx(n)
    assert (freq[:4] == 0).all() and (freq <= 1).all()
    if activation == "topk":
        assert (freq.sum() <= 5 + 1e-9).item()

    latent = int(freq.argmax())
    top = acts.top(latent, 3)
    values = [v for v, _, _ in top]
    assert values == sorted(values, reverse=True) and len(top) == 3
    assert values[0] == acts.value[acts.latent == latent].max().item()
    for value, w, p in top:
        hit = (acts.latent == latent) & (acts.window == w) & (acts.position == p)
        assert acts.value[hit].tolist() == [value]
    assert acts.top(0, 3) == []


def test_collect_activations_of_no_text(tmp_path):
    model, tokenizer = tiny_bert()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    acts = collect_activations(sae_for("topk"), model, tokenizer, HOOK, str(empty))
    assert acts.windows == [] and acts.n_tokens == 0 and len(acts.value) == 0
    assert acts.frequencies(64).sum() == 0


def frequencies(alive: int, dead: int) -> torch.Tensor:
    """Latent i < alive fires on a fraction (alive - i) / 100; the rest never fire."""
    freq = torch.zeros(alive + dead, dtype=torch.float64)
    freq[:alive] = torch.arange(alive, 0, -1) / 100
    return freq[torch.randperm(alive + dead, generator=torch.Generator().manual_seed(0))]


def test_pick_features_spreads_over_the_frequency_range():
    freq = frequencies(alive=12, dead=4)
    by_rank = freq.argsort(descending=True).tolist()  # frequencies are distinct
    # Ranks 1..9 lie between the 10th and 90th percentile; 5 picks cover both ends evenly.
    assert pick_features(freq, 5) == [by_rank[r] for r in (1, 3, 5, 7, 9)]
    assert pick_features(freq, 1) == [by_rank[5]]
    assert pick_features(freq, 50) == by_rank[1:10]


def test_pick_features_reaches_the_rare_end():
    freq = frequencies(alive=15, dead=0)
    picks = pick_features(freq, 8)
    assert len(set(picks)) == 8
    ranks = [freq.argsort(descending=True).tolist().index(i) for i in picks]
    assert ranks == sorted(ranks) and ranks[0] == 1 and ranks[-1] == 12


def test_pick_features_skips_latents_that_never_fired():
    freq = frequencies(alive=3, dead=20)
    picks = pick_features(freq, 8)
    assert picks and all(freq[i] > 0 for i in picks)
    assert pick_features(torch.zeros(10), 4) == []
    assert pick_features(freq, 0) == []


def test_context_is_the_text_around_a_token():
    tokenizer = minilm_tokenizer()
    ids = tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    assert context(tokenizer, ids, 2, before=2, after=1) == ("the quick", "brown", "fox")
    assert context(tokenizer, ids, 0, before=3, after=10) == ("", "the", "quick brown fox jumps")
    assert context(tokenizer, ids, 4) == ("the quick brown fox", "jumps", "")
