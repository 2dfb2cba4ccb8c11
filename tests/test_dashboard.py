"""Feature dashboards: the bounded heaps and histograms against brute force, the streaming
pass against the exhaustive activations of collect_activations, the records' neighbours,
co-firing and output-side effects against direct computation, and the command's folder."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from model_folders import save_bert, save_model, write_corpus
from models import WIDTH, minilm_tokenizer, tiny_bert, tiny_causal_lm

from sae_fast import SparseAutoencoder, SparseCode
from sae_fast.analysis.best_k import BestK
from sae_fast.analysis.dashboard import (
    SCHEMA,
    TokenPieces,
    cofiring,
    distinct_contexts,
    feature_records,
    output_effect,
    pick_latents,
)
from sae_fast.analysis.feature_stats import (
    AFTER,
    BEFORE,
    SAMPLE_SIZE,
    TOP_HELD,
    DoublingHistogram,
    FeatureStats,
    FeatureStatsError,
    collect_feature_stats,
)
from sae_fast.analysis.feature_stats import (
    WIDTH as WIDTH_CTX,
)
from sae_fast.analysis.features import collect_activations
from sae_fast.cli import main

HOOK = "resid_post.0"


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict readers do."""
    return json.loads(text, parse_constant=_refuse)


def test_best_k_keeps_each_rows_best_entries_with_their_payloads():
    gen = torch.Generator().manual_seed(0)
    rows, size, n = 7, 5, 400
    heap = BestK(rows, size, {"id": ((), torch.int64), "pair": ((2,), torch.float32)})
    row = torch.randint(0, rows - 1, (n,), generator=gen)  # the last row gets nothing
    score = torch.randperm(n, generator=gen).float()  # distinct: one right answer
    for part in torch.arange(n).split(37):  # uneven batches
        pick = part[heap.select(row[part], score[part])]
        heap.insert(row[pick], score[pick], id=pick, pair=torch.stack([score[pick]] * 2, 1))
    for r in range(rows):
        mine = (row == r).nonzero().squeeze(1)
        want = mine[score[mine].argsort(descending=True)][:size]
        got = heap.payload["id"][r][heap.filled()[r]]
        assert got.tolist() == want.tolist()
        assert heap.score[r][: len(want)].tolist() == score[want].tolist()
        assert (heap.payload["pair"][r][: len(want), 1] == score[want]).all()
    assert not heap.filled()[rows - 1].any()


def test_best_k_on_random_keys_is_a_uniform_sample():
    # 2000 rows each offered the same 20 entries in 4 batches: every entry must be kept with
    # probability size / 20, whichever batch it came in.
    gen = torch.Generator().manual_seed(1)
    rows, size, n = 2000, 5, 20
    heap = BestK(rows, size, {"id": ((), torch.int64)})
    row = torch.arange(rows).repeat_interleave(n)
    entry = torch.arange(n).repeat(rows)
    order = torch.arange(n * rows).view(rows, n).T.reshape(4, -1)  # batch b: entries 5b..5b+4
    for part in order:
        key = torch.rand(part.numel(), generator=gen)
        pick = heap.select(row[part], key)
        heap.insert(row[part][pick], key[pick], id=entry[part][pick])
    kept = torch.bincount(heap.payload["id"].reshape(-1), minlength=n).double() / rows
    # Binomial(2000, 0.25): the standard deviation of a share is 0.0097.
    assert (kept - size / n).abs().max() < 0.04


def test_doubling_histogram_is_exact_as_its_range_grows():
    gen = torch.Generator().manual_seed(2)
    hist = DoublingHistogram(3, 16, "cpu")
    values = [[], [], []]
    for scale in (0.01, 0.3, 7.0, 0.2, 90.0):  # maxima that jump, and fall back
        row = torch.randint(0, 2, (50,), generator=gen)  # row 2 never gets a value
        value = torch.rand(50, generator=gen) * scale + 1e-6
        hist.add(row, value)
        for r, v in zip(row.tolist(), value.tolist(), strict=True):
            values[r].append(v)
    for r in range(2):
        top = hist.upper()[r].item()
        peak = max(values[r])
        assert peak <= top < 2 * peak  # the bins span at most twice the maximum
        edges = torch.linspace(0, top, 17, dtype=torch.float64)
        want = torch.histogram(torch.tensor(values[r], dtype=torch.float64), edges).hist
        assert hist.counts[r].tolist() == want.long().tolist()
    assert hist.counts[2].sum() == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt", paragraphs=30)


def _by_token(acts):
    """{(window, position): {latent: value}} from collect_activations' flat entries."""
    found: dict = {}
    for v, i, w, p in zip(acts.value.tolist(), acts.latent.tolist(), acts.window.tolist(),
                          acts.position.tolist(), strict=True):  # fmt: skip
        found.setdefault((w, p), {})[i] = v
    return found


def _context_is(acts, codes, w, p, f, ids, got) -> bool:
    """Whether ids, got (WIDTH,) are the tokens and f's activations around (w, p)."""
    for o in range(-BEFORE, AFTER + 1):
        inside = 0 <= p + o < len(acts.windows[w])
        if ids[BEFORE + o].item() != (acts.windows[w][p + o] if inside else -1):
            return False
        want = codes.get((w, p + o), {}).get(f, 0.0) if inside else 0.0
        if abs(got[BEFORE + o].item() - want) > 1e-5:
            return False
    return True


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_the_pass_matches_every_activation_of_the_text(corpus, activation):
    model, tokenizer = tiny_causal_lm()
    torch.manual_seed(0)
    k = 4 if activation == "topk" else None
    sae = SparseAutoencoder(WIDTH, 48, k=k, activation=activation).eval()
    with torch.no_grad():  # sparse dense codes: most latents off, some tokens all off
        if activation == "relu":
            sae.b_enc.fill_(-0.05)
        if activation == "jumprelu":
            sae.log_threshold.fill_(math.log(0.05))
    features = torch.tensor([0, 5, 17, 30, 47])
    # Two windows a batch: contexts must stop at window ends inside a batch too.
    stats = collect_feature_stats(sae, model, tokenizer, HOOK, corpus, features, context_size=20,
                                  max_tokens=1500, batch_size=2)  # fmt: skip
    acts = collect_activations(sae, model, tokenizer, HOOK, corpus, 20, max_windows=None,
                               max_tokens=1500)  # fmt: skip
    # The exhaustive pass stops after the window that reaches 1500 tokens; this one at 1500.
    assert stats.n_tokens == 1500
    flat = {(w, p) for w, ids in enumerate(acts.windows) for p in range(len(ids))}
    flat = set(sorted(flat)[:1500])
    keep = torch.tensor([(w, p) in flat for w, p in zip(acts.window.tolist(),
                         acts.position.tolist(), strict=True)])  # fmt: skip
    latent, value = acts.latent[keep], acts.value[keep]
    assert stats.firings.tolist() == torch.bincount(latent, minlength=48).tolist()
    for i in range(48):
        mine = value[latent == i]
        # Another batching pads the windows otherwise: the model's rounding differs.
        assert abs(stats.peak[i].item() - (mine.max().item() if mine.numel() else 0.0)) < 1e-5
        assert abs(stats.total[i].item() - mine.double().sum().item()) < 1e-4
    codes = _by_token(acts)
    for row, f in enumerate(features.tolist()):
        mine = value[latent == f].sort(descending=True).values[:TOP_HELD]
        held = stats.top.score[row][stats.top.filled()[row]]
        assert torch.allclose(held, mine, atol=1e-5)
        assert stats.histogram.counts[row].sum() == (latent == f).sum()
        for heap in (stats.top, stats.sample):
            for slot in heap.filled()[row].nonzero().squeeze(1).tolist():
                ids, got = heap.payload["ids"][row, slot], heap.payload["acts"][row, slot]
                centre = got[BEFORE].item()
                hits = [(w, p) for (w, p), lat in codes.items()
                        if (w, p) in flat and abs(lat.get(f, 0) - centre) < 1e-5
                        and acts.windows[w][p] == ids[BEFORE]]  # fmt: skip
                # Repeated paragraphs can repeat a firing: one of them must be the context.
                assert any(_context_is(acts, codes, w, p, f, ids, got) for w, p in hits)
    # The uniform sample holds every firing of a feature that fired fewer times than its size.
    small = [r for r, f in enumerate(features.tolist()) if 0 < stats.firings[f] <= SAMPLE_SIZE]
    for row in small:
        assert stats.sample.filled()[row].sum() == stats.firings[features[row]]


def test_a_batchtopk_code_wider_than_k_and_non_finite_values():
    # Uncalibrated, a BatchTopK SAE codes a batch with its batch top n*k: rows wider than k.
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, k=2, activation="batchtopk").eval()
    x = torch.randn(40, 8)
    code = sae.encode(x)
    assert code.values.shape[1] > 2
    stats = FeatureStats.of(sae, torch.arange(32))
    stats.add(torch.arange(40), torch.zeros(40, dtype=torch.int64), code)
    active = [set(i[v > 0].tolist()) for v, i in zip(code.values, code.indices, strict=True)]
    assert stats.firings.sum() == sum(map(len, active))
    # Each sampled firing holds its token's other latents: some token's set, whole.
    cofire = stats.sample.payload["cofire"][stats.sample.filled()]
    for row in cofire.tolist():
        assert {i for i in row if i >= 0} in active
    # An SAE whose float16 activations overflow: said, not written as Infinity.
    overflow = SparseCode(torch.tensor([[math.inf], [1.0]]), torch.tensor([[0], [1]]))
    with pytest.raises(FeatureStatsError, match="not finite.*float32"):
        stats.add(torch.arange(2), torch.zeros(2, dtype=torch.int64), overflow)


def test_cofiring_is_exact_when_the_sample_holds_every_firing(corpus):
    model, tokenizer = tiny_causal_lm()
    torch.manual_seed(3)
    sae = SparseAutoencoder(WIDTH, 64, k=3).eval()
    stats = collect_feature_stats(sae, model, tokenizer, HOOK, corpus, torch.arange(64),
                                  context_size=32, max_tokens=600)  # fmt: skip
    acts = collect_activations(sae, model, tokenizer, HOOK, corpus, 32, max_windows=None,
                               max_tokens=600)  # fmt: skip
    codes = list(_by_token(acts).items())
    order = sorted(codes)[:600]
    density = stats.firings.double() / stats.n_tokens
    found = cofiring(stats)
    checked = 0
    for f in range(64):
        if not 0 < stats.firings[f] <= SAMPLE_SIZE:
            continue
        mine = [lat for _, lat in order if f in lat]
        for entry in found[f]:
            g = entry["index"]
            given = sum(g in lat for lat in mine) / len(mine)
            joint = density[f].item() * given
            assert abs(entry["given"] - given) < 1e-9
            assert abs(entry["jaccard"] - joint / (density[f] + density[g] - joint)) < 1e-9
            checked += 1
        jaccards = [e["jaccard"] for e in found[f]]
        assert jaccards == sorted(jaccards, reverse=True)
    assert checked > 20


def test_output_effect_reads_the_unembedding_of_a_causal_lm_and_embeddings_of_an_encoder():
    torch.manual_seed(0)
    directions = torch.randn(5, WIDTH)
    lm, _ = tiny_causal_lm()
    about, hi_v, hi_i, lo_v, lo_i = output_effect(lm, directions, count=4)
    assert about["kind"] == "unembedding_logits"
    logits = directions @ lm.get_output_embeddings().weight.detach().T
    assert torch.equal(hi_i, logits.topk(4).indices)
    assert torch.allclose(hi_v, logits.topk(4).values)
    assert torch.equal(lo_i, (-logits).topk(4).indices)
    assert torch.allclose(lo_v, -(-logits).topk(4).values)
    bert, _ = tiny_bert()
    about, hi_v, hi_i, lo_v, _ = output_effect(bert, directions, count=4)
    assert (hi_v[:, :-1] >= hi_v[:, 1:]).all()  # nearest first
    assert about["kind"] == "input_embedding_cosine" and "not an output effect" in about["label"]
    emb = bert.get_input_embeddings().weight.detach()
    cos = (
        torch.nn.functional.normalize(directions, dim=1)
        @ torch.nn.functional.normalize(emb, dim=1).T
    )
    assert torch.equal(hi_i, cos.topk(4).indices) and lo_v.shape == (5, 0)
    about, *rest = output_effect(bert, torch.randn(5, WIDTH * 2))
    assert about["kind"] == "none" and "width 32, the hook 64" in about["label"]
    assert rest == [None] * 4


def test_token_pieces_join_as_the_tokenizer_decodes():
    tokenizer = minilm_tokenizer()  # WordPiece: '##' pieces join the word before them
    ids = tokenizer("Tokenizers split unbelievably long words.", add_special_tokens=False)[
        "input_ids"
    ]
    pieces = TokenPieces(tokenizer)(ids)
    assert any(not p.startswith(" ") for p in pieces[1:])  # a word piece
    assert "".join(pieces).strip() == tokenizer.decode(ids)
    # Punctuation split off words joins back as the tokenizer's decode cleans it up.
    ids = tokenizer("It's the user's dict, or None. Don't!", add_special_tokens=False)["input_ids"]
    pieces = TokenPieces(tokenizer)(ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces).strip() == "it's the user's dict, or none. don't!"
    assert "".join(pieces).strip() == tokenizer.decode(ids, clean_up_tokenization_spaces=True)
    # A byte-level BPE (GPT-2's kind), trained here: spaces live in the tokens.
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = fast("the quick brownish fox", add_special_tokens=False)["input_ids"]
    assert "".join(TokenPieces(fast)(ids)) == fast.decode(ids)


def test_pick_latents_reads_all_counts_and_ranges():
    assert pick_latents("all", 5).tolist() == [0, 1, 2, 3, 4]
    drawn = pick_latents("10", 100)
    assert len(set(drawn.tolist())) == 10 and drawn.tolist() == sorted(drawn.tolist())
    assert torch.equal(drawn, pick_latents("10", 100))  # seeded
    assert pick_latents("7, 3,10-12", 20).tolist() == [3, 7, 10, 11, 12]
    for bad, words in (("0", "1..20"), ("21", "1..20"), ("5-2", "not a range"),
                       ("3,x", "ids like"), ("3-", "ids like"), ("19-20", "0..19"),
                       ("\u00b2", "ids like"), ("1-\u0663", "ids like")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            pick_latents(bad, 20)


def test_records_hold_neighbours_by_decoder_cosine(corpus):
    model, tokenizer = tiny_causal_lm()
    torch.manual_seed(0)
    sae = SparseAutoencoder(WIDTH, 32, k=4).eval()
    features = torch.tensor([2, 9])
    stats = collect_feature_stats(sae, model, tokenizer, HOOK, corpus, features,
                                  context_size=32, max_tokens=400)  # fmt: skip
    records, effect = feature_records(stats, sae.W_dec, model, tokenizer, {"hook": HOOK})
    assert effect["kind"] == "unembedding_logits"
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    for record, f in zip(records, features.tolist(), strict=True):
        assert record["schema"] == SCHEMA and record["index"] == f and record["hook"] == HOOK
        cos = unit @ unit[f]
        cos[f] = -2
        want = cos.topk(10)
        assert [n["index"] for n in record["nearest_decoder"]] == want.indices.tolist()
        assert record["firings"] == stats.firings[f] and record["tokens_seen"] == 400
        for example in record["top_examples"]:
            assert example["values"][example["token_index"]] == example["value"] > 0
            assert len(example["tokens"]) == len(example["values"]) <= BEFORE + AFTER + 1
        assert len(record["output_effect"]["positive"]) == 10


def _passage(start: int, shift: int = 0, shown: int = WIDTH_CTX) -> list[int]:
    """A context window of the passage 100, 101, ... with its highlight moved by shift; -1
    where the window runs past the document (shown: how many positions hold a token)."""
    row = [100 + start + shift + t for t in range(WIDTH_CTX)]
    return [v if t < shown else -1 for t, v in enumerate(row)]


def test_distinct_contexts_leave_out_repeats_and_moved_highlights():
    rows = [
        _passage(0),  # 0: kept
        _passage(0),  # 1: the same tokens (a boilerplate line met twice)
        _passage(0, shift=3),  # 2: the same passage, the highlight 3 tokens on
        _passage(0, shift=-AFTER),  # 3: ... AFTER tokens back
        _passage(500),  # 4: another passage: kept
        _passage(0, shift=AFTER + 1),  # 5: one place further than a repeat may move: kept
        [7] * 3 + [-1] * (WIDTH_CTX - 3),  # 6: a short context: kept
        [7] * 3 + [-1] * (WIDTH_CTX - 3),  # 7: the same short context
        _passage(900),  # 8: past the limit
    ]
    ids = torch.tensor(rows)
    assert distinct_contexts(ids, limit=4) == [0, 4, 5, 6]
    assert distinct_contexts(ids, limit=16) == [0, 4, 5, 6, 8]
    assert distinct_contexts(ids[:0], limit=16) == []


def test_a_features_top_examples_are_distinct_passages(tmp_path):
    """Over a text whose paragraphs repeat, no feature shows one context twice."""
    model, tokenizer = tiny_causal_lm()
    text = write_corpus(tmp_path / "repeats.txt", paragraphs=120)  # each paragraph 3-4 times
    torch.manual_seed(0)
    sae = SparseAutoencoder(WIDTH, 32, k=4).eval()
    features = torch.arange(32)
    stats = collect_feature_stats(sae, model, tokenizer, HOOK, text, features,
                                  context_size=32, max_tokens=6000)  # fmt: skip
    records, _ = feature_records(stats, sae.W_dec, model, tokenizer, {"hook": HOOK})
    repeated = 0
    for record, row in zip(records, range(32), strict=True):
        filled = stats.top.filled()[row]
        shown = [(tuple(e["tokens"]), e["token_index"]) for e in record["top_examples"]]
        assert len(set(shown)) == len(shown)
        distinct = distinct_contexts(stats.top.payload["ids"][row][filled], TOP_HELD)
        assert len(shown) == min(16, len(distinct))
        repeated += len(distinct) < filled.sum().item()
    assert repeated > 0  # the text's repeats reached the held examples, and were left out


def test_the_command_writes_the_folder_whole_and_names_bad_arguments(tmp_path, corpus, capsys):
    model = save_model(tmp_path / "gpt")
    torch.manual_seed(0)
    SparseAutoencoder(WIDTH, 40, k=4).save(tmp_path / "sae")
    out = tmp_path / "dash"
    args = ["dashboard", "--sae", str(tmp_path / "sae"), "--model", model, "--hook", HOOK,
            "--text", corpus, "--out", str(out), "--tokens", "800", "--no-progress"]  # fmt: skip
    old = os.umask(0o022)
    try:
        assert main([*args, "--features", "0-9"]) == 0
    finally:
        os.umask(old)
    assert "10 features over 800 tokens" in capsys.readouterr().out
    meta = strict_json((out / "dashboard.json").read_text())
    assert meta["shown"] == 10 and meta["n_latents"] == 40 and meta["tokens_seen"] == 800
    assert sum(meta["density_histogram"]["counts"]) + meta["density_histogram"]["dead"] == 40
    pages = sorted(p.name for p in (out / "features").iterdir())
    assert pages == sorted([f"{i}.{ext}" for i in range(10) for ext in ("html", "json")])
    record = strict_json((out / "features" / "3.json").read_text())
    assert record["index"] == 3 and record["model"] == model and record["text"] == corpus
    data = (out / "data.js").read_text()
    assert data.startswith("window.SAE_DASHBOARD = ")
    rows = strict_json(data.removeprefix("window.SAE_DASHBOARD = ").rstrip().rstrip(";"))
    assert [r[0] for r in rows["features"]] == list(range(10))
    for path in (out / "index.html", out / "features" / "3.json", out / "features"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044  # readable by others
    # Run again: the folder is replaced whole.
    assert main([*args, "--features", "2"]) == 0
    assert len(list((out / "features").iterdir())) == 4
    # An encoder model gets nearest input embeddings, labelled as such.
    bert = save_bert(tmp_path / "bert")
    assert main([*args[:4], bert, *args[5:], "--features", "1"]) == 0
    record = next(json.loads(p.read_text()) for p in (out / "features").glob("*.json"))
    assert record["output_effect"]["kind"] == "input_embedding_cosine"
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"some text\n\x00\x89PNG")
    for extra, words in (
        (["--features", "50"], "--features: a count of features must be in 1..40"),
        (["--features", "x"], "--features: expected 'all'"),
        (["--tokens", "0"], "--tokens"),
        (["--text", str(tmp_path / "missing.txt")], "--text: "),
        (["--out", str(tmp_path / "mine")], "notes.txt"),  # before the pass
        (["--text", str(binary)], "binary.txt:2 holds a NUL byte"),
        (["--text", str(empty)], "holds no tokens"),
    ):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (out / "features" / "notes.md").write_text("keep me too")  # in the dashboard's own folder
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "would delete (features/notes.md)" in err and "Traceback" not in err
    assert (out / "features" / "notes.md").read_text() == "keep me too"
    (out / "features" / "notes.md").unlink()
    # Text that is not UTF-8 reads with one warning, not a traceback.
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(Path(corpus).read_text().replace("e", "\xe9").encode("latin-1"))
    with pytest.warns(UserWarning, match=r"latin1.txt:1 is not UTF-8"):
        assert main([*args[:8], str(latin1), *args[9:], "--features", "1"]) == 0


# CI installs SAEDashboard and the neuronpedia package (without their dependencies: see
# .ci/run) and sets this: there a missing one fails instead of skipping.
NEURONPEDIA_REQUIRED = os.environ.get("SAE_FAST_REQUIRE_NEURONPEDIA") == "1"


def test_neuronpedia_batch_files_are_what_saedashboard_and_neuronpedia_take(
    tmp_path, corpus, capsys, monkeypatch
):
    try:
        from neuronpedia.np_activation import Activation
        from neuronpedia.np_feature import Feature, Logit
        from neuronpedia.requests.feature_request import FeatureRequest
        from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
    except ImportError as e:
        if NEURONPEDIA_REQUIRED:
            raise
        pytest.skip(f"sae-dashboard or neuronpedia is not installed ({e}); CI installs them")
    model = save_model(tmp_path / "gpt")
    torch.manual_seed(0)
    SparseAutoencoder(WIDTH, 200, k=4).save(tmp_path / "sae")
    out = tmp_path / "dash"
    args = ["dashboard", "--sae", str(tmp_path / "sae"), "--model", model, "--hook", HOOK,
            "--text", corpus, "--out", str(out), "--tokens", "600", "--no-progress",
            "--features", "0-139"]  # fmt: skip
    assert main([*args, "--neuronpedia", "Res SF"]) == 2
    assert "--neuronpedia: expected a name of lowercase letters" in capsys.readouterr().err
    assert main([*args, "--neuronpedia", "res-sf"]) == 0
    records = {r["index"]: r for r in map(strict_json, map(Path.read_text,
               (out / "features").glob("*.json")))}  # fmt: skip
    names = sorted(p.name for p in (out / "neuronpedia").iterdir())
    assert names == ["batch-0.json", "batch-1.json", "upload-batch-0.json", "upload-batch-1.json"]
    layer = int(HOOK.rsplit(".", 1)[1])
    seen, sent, fired = [], [], 0  # sent: the bodies the neuronpedia package would POST
    monkeypatch.setattr(FeatureRequest, "send_request", lambda self, **kw: sent.append(kw["json"]))
    for n in (0, 1):
        # SAEDashboard's own classes take every key of its batch file.
        body = strict_json((out / "neuronpedia" / f"batch-{n}.json").read_text())
        batch = NeuronpediaDashboardBatch(**body)
        assert (batch.model_id, batch.layer, batch.sae_set) == (model, layer, "res-sf")
        for feature in batch.features:
            record = records[feature.feature_index]
            assert feature.frac_nonzero == record["density"]
            assert len(feature.activations) == len(record["top_examples"]) + sum(
                len(g["examples"]) for g in record["quantile_examples"])  # fmt: skip
            if record["top_examples"]:  # a feature that fired: its examples, top first
                assert feature.activations[0].values == record["top_examples"][0]["values"]
                fired += 1
            assert feature.pos_str == [t["token"] for t in record["output_effect"]["positive"]]
            seen.append(feature.feature_index)
        # The neuronpedia package, given the same features, would send this very body.
        upload = strict_json((out / "neuronpedia" / f"upload-batch-{n}.json").read_text())
        source = f"{layer}-res-sf"
        assert (upload["modelId"], upload["source"]) == (model, source)
        features = []
        for item in upload["features"]:
            i = item["index"]
            logits = {side: [Logit(**t) for t in item[side] or []] or None
                      for side in ("topLogits", "bottomLogits")}  # fmt: skip
            activations = [Activation(modelId=model, source=source, index=i, **a)
                           for a in item["activations"]]  # fmt: skip
            features.append(Feature(modelId=model, source=source, index=i,
                                    density=item["density"], activations=activations,
                                    top_logits=logits["topLogits"],
                                    bottom_logits=logits["bottomLogits"]))  # fmt: skip
        sent.clear()
        FeatureRequest(api_key="offline").upload_batch(model, source, features)
        assert sent == [upload]
    assert sorted(seen) == list(range(140)) and fired > 20  # 128 + 12 features, each once
    # Run again: the folder, neuronpedia/ included, is its own and is replaced.
    assert main(args) == 0
    assert not (out / "neuronpedia").exists()
