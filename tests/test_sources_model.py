"""Token windows, per-window model activations and the shuffled ModelSource."""

from __future__ import annotations

import pytest
import torch
from models import N_POSITIONS, WIDTH, minilm_tokenizer, tiny_bert, tiny_causal_lm
from source_checks import assert_exact_resume

from sae_fast.sources import (
    HookPointError,
    ModelSource,
    SourceError,
    model_activations,
    run_to_hook,
    special_tokens,
    token_windows,
)
from sae_fast.sources.text import documents

SENTENCE = "the quick brown fox jumps over a lazy dog while seven wizards quietly box"


def corpus(path, n_docs: int = 12) -> str:
    """A .txt corpus of n_docs paragraphs of 3 to 40 words; returns its path."""
    g, words = torch.Generator().manual_seed(0), SENTENCE.split()
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(3, 40, (1,), generator=g))
        docs.append(
            " ".join(words[int(i)] for i in torch.randint(len(words), (length,), generator=g))
        )
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def test_special_tokens():
    tokenizer = minilm_tokenizer()
    assert special_tokens(tokenizer) == ([tokenizer.cls_token_id], [tokenizer.sep_token_id])


def test_token_windows_cover_every_token():
    tokenizer = minilm_tokenizer()
    docs = ["one two three four five six seven eight nine ten eleven twelve thirteen", "", "hi"]
    windows = list(token_windows(tokenizer, docs, context_size=6))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert [len(w) for w in windows] == [6, 6, 6, 3, 3]
    assert all(w[0] == cls and w[-1] == sep for w in windows)
    body = [t for w in windows[:4] for t in w[1:-1]]
    assert body == tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert windows[4] == tokenizer("hi")["input_ids"]
    with pytest.raises(SourceError, match=r"context_size \(2\) must exceed the 2 special"):
        list(token_windows(tokenizer, docs, context_size=2))


@pytest.mark.parametrize("build", [tiny_causal_lm, tiny_bert])
def test_model_activations_drop_padding_and_special_tokens(build):
    model, tokenizer = build()
    docs = ["a short one", "a somewhat longer document about foxes and dogs " * 3, "x"]
    windows = list(token_windows(tokenizer, docs, context_size=16))
    rows = list(model_activations(model, tokenizer, "resid_post.1", windows, batch_size=3))
    assert len(rows) == len(windows)
    for window, (ids, acts) in zip(windows, rows, strict=True):
        assert ids.tolist() == window[1:-1]
        assert acts.shape == (len(window) - 2, WIDTH)
        # Padding changes nothing: the window alone, unpadded, gives the same activations.
        alone = run_to_hook(model, "resid_post.1", input_ids=torch.tensor([window]))
        torch.testing.assert_close(acts, alone[0, 1:-1])
    kept = list(model_activations(model, tokenizer, "mlp_out.0", windows, 2, exclude_special=False))
    assert [ids.tolist() for ids, _ in kept] == windows
    assert [a.shape[0] for _, a in kept] == [len(w) for w in windows]


def make_source(path, **kwargs):
    model, tokenizer = tiny_causal_lm()
    settings = {"context_size": 16, "batch_size": 3, "shuffle_buffer": 64, "seed": 1} | kwargs
    return ModelSource(model, tokenizer, "resid_post.0", path, **settings)


def test_model_source_draws_every_activation_and_cycles(tmp_path):
    path = corpus(tmp_path / "docs.txt")
    model, tokenizer = tiny_causal_lm()
    windows = token_windows(tokenizer, documents(path), 16)
    rows = model_activations(model, tokenizer, "resid_post.0", windows, batch_size=3)
    everything = torch.cat([acts for _, acts in rows])
    source = make_source(path)
    assert source.d_in == WIDTH
    drawn = torch.cat([source.next_batch(50) for _ in range(3 * everything.shape[0] // 50)])
    assert source.epoch >= 2
    # Each drawn row is one of the corpus's activations, bit for bit, and all of them come up.
    match = (drawn[:, None, :] == everything[None, :, :]).all(dim=2)
    assert match.any(dim=1).all()
    assert match.any(dim=0).all()
    # Shuffled: consecutive draws do not follow the corpus order.
    first = match[:50].float().argmax(dim=1)
    assert not torch.equal(first, first.sort().values)


def test_model_source_exact_resume(tmp_path):
    path = corpus(tmp_path / "docs.txt", n_docs=6)
    # 13 windows (the last forward of an epoch holds 1), 140 tokens: the state is saved in
    # epoch 1 and the batches after it cross two more epochs.
    resumed = assert_exact_resume(lambda: make_source(path), n=32, before=6, after=8)
    assert resumed.epoch == 3


def test_model_source_resume_runs_the_model_only_on_new_windows(tmp_path):
    path = corpus(tmp_path / "docs.txt", n_docs=40)
    source = make_source(path, shuffle_buffer=32)
    source.next_batch(8)
    state = source.state_dict()
    assert state["epoch"] == 0 and state["position"] > 0

    def forwards_for(src) -> tuple[torch.Tensor, int]:
        calls = []
        handle = src.model.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            return src.next_batch(100), len(calls)
        finally:
            handle.remove()

    expected, needed = forwards_for(source)
    resumed = make_source(path, shuffle_buffer=32)
    resumed.load_state_dict(state)
    got, ran = forwards_for(resumed)
    assert torch.equal(got, expected)
    assert ran == needed


def test_model_source_describe(tmp_path):
    path = corpus(tmp_path / "docs.txt")
    info = make_source(path).describe()
    assert info["kind"] == "model" and info["architecture"] == "GPT2LMHeadModel"
    assert info["hook"] == "resid_post.0" and info["module"] == "transformer.h.0"
    assert info["d_in"] == WIDTH and info["dtype"] == "float32" and info["text"] == path
    assert info["context_size"] == 16 and info["exclude_special"] is True


def test_model_source_refuses_another_sources_state(tmp_path):
    path = corpus(tmp_path / "docs.txt")
    state = make_source(path).state_dict()
    with pytest.raises(SourceError, match="different source"):
        make_source(path, context_size=20).load_state_dict(state)


def test_model_source_errors(tmp_path):
    path = corpus(tmp_path / "docs.txt")
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(SourceError, match="empty.txt' holds no text"):
        make_source(str(tmp_path / "empty.txt"))
    with pytest.raises(SourceError, match="missing.txt does not exist"):
        make_source(str(tmp_path / "missing.txt"))
    with pytest.raises(SourceError, match=f"context_size .* exceeds the model's {N_POSITIONS}"):
        make_source(path, context_size=N_POSITIONS + 1)
    with pytest.raises(SourceError, match="batch_size must be a positive int"):
        make_source(path, batch_size=0)
    model, tokenizer = tiny_causal_lm()
    with pytest.raises(HookPointError, match="mlp_out.7"):
        ModelSource(model, tokenizer, "mlp_out.7", path)


@pytest.mark.gpu
def test_model_source_on_cuda(tmp_path):
    path = corpus(tmp_path / "docs.txt", n_docs=6)

    def make() -> ModelSource:
        model, tokenizer = tiny_causal_lm()
        return ModelSource(model.cuda(), tokenizer, "resid_post.0", path, 16, 3, 64, seed=1)

    resumed = assert_exact_resume(make, n=32, before=6, after=8)
    assert resumed.next_batch(4).device.type == "cuda"


def test_a_huge_document_is_tokenised_only_as_far_as_its_windows_are_taken():
    tokenizer = minilm_tokenizer()
    calls = []

    def counting(texts, **kw):
        calls.append(sum(map(len, texts)))
        return tokenizer(texts, **kw)

    huge = " ".join([SENTENCE] * 200_000)  # 15 MB on one line
    windows = token_windows(counting, [huge, "after"], context_size=64)
    first = [next(windows) for _ in range(4)]
    assert sum(calls[2:]) <= 1 << 16  # one piece, not 15 MB (2 calls: special_tokens)
    # Cut in pieces at whitespace, the ids are the whole document's.
    doc = " ".join([SENTENCE] * 3000)  # 3 pieces
    whole = tokenizer(doc, add_special_tokens=False)["input_ids"]
    got = [t for w in token_windows(tokenizer, [doc, "x"], context_size=64) for t in w[1:-1]]
    assert got[: len(whole)] == whole and len(got) == len(whole) + 1
    assert first[0][1:-1] == whole[:62]
    no_spaces = "x" * 200_000  # nowhere to cut but the limit: 4 pieces, each one word
    ids = [t for w in token_windows(tokenizer, [no_spaces], 64) for t in w[1:-1]]
    assert ids == [tokenizer.unk_token_id] * 4  # a word too long for WordPiece
