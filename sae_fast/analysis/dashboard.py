"""Feature dashboards: from one streaming pass (feature_stats.py), a JSON-able record per
feature with its statistics, examples, histogram, neighbours and output-side effect.

The record's schema (`SCHEMA`) is documented in docs/DASHBOARD.md with its mapping to
Neuronpedia's feature export. Estimates and their sources:
- co-firing: from each feature's uniform sample of SAMPLE_SIZE firings, the latents active on
  the same token: P(g | f) is their share of the sample, and they are ranked by the Jaccard
  index d_fg / (d_f + d_g - d_fg) with d_fg = d_f P(g | f) (d: firing densities, exact), so a
  near-dense latent does not top every list;
- quantile examples: the sample sorted by activation and cut into QUANTILES groups of equal
  count, so group q holds firings from the q-th activation quantile;
- output-side effect: for a causal LM whose unembedding reads the hook's width, the logits the
  decoder direction adds through the unembedding alone (the final norm left out, as logit
  tables usually do); otherwise, when the input embeddings have the hook's width (encoders
  such as MiniLM), the input-embedding tokens nearest the direction by cosine, which is not an
  effect on any output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..clt.config import recorded_hook
from ..clt.module import CrossLayerTranscoder
from ..options import is_natural
from ..sae import SparseAutoencoder
from ..sources.hooks import is_causal_lm
from ..sources.seeds import seeded_generator
from .best_k import rank_within
from .compare import cosine_blocks, nearest_rows, unit_rows
from .dashboard_html import density_histogram, write_dashboard
from .feature_stats import AFTER, BEFORE, TOP_EXAMPLES, WIDTH, FeatureStats, collect_feature_stats
from .neuronpedia import neuronpedia_files

SCHEMA = "sae_fast.dashboard.feature/1"
_RUN = WIDTH // 2  # shared tokens that make two contexts one passage
_PROBE = "It's a, b. Don't!"  # punctuation a decode may space out and clean up
NEIGHBOURS = 10  # nearest decoder features, co-firing features
EFFECT_TOKENS = 10  # promoted and suppressed (or nearest) tokens
EFFECT_BLOCK = 1 << 24  # logits or cosines held at a time: 64 MiB in float32
QUANTILES = 4
QUANTILE_EXAMPLES = 4
SUMMARY_TOKENS = 3


class TokenPieces:
    """Each token id's text as it reads inside a text: ' the' for GPT-2's 'Ġthe', 'ing' for
    BERT's '##ing'. The tokenizer joins an anchor token and the token; the piece is what the
    join adds after the anchor, so any tokenizer spells its own word boundaries. Where the
    tokenizer's decode cleans up spaces it puts around punctuation (BERT's: "it ' s" ->
    "it's"), a sequence's pieces lose those spaces too."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        first = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        self.anchor = tokenizer.convert_ids_to_tokens(first)[0]
        self.base = tokenizer.convert_tokens_to_string([self.anchor])
        self.known: dict[int, str] = {}
        # Whether the tokenizer's decode cleans up spaces it puts around punctuation.
        probe = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        spaced = tokenizer.decode(probe, clean_up_tokenization_spaces=False)
        cleaned = tokenizer.decode(probe, clean_up_tokenization_spaces=True)
        self.clean = tokenizer.clean_up_tokenization if spaced != cleaned else None

    def __call__(self, ids: list[int]) -> list[str]:
        for i in {i for i in ids if i not in self.known}:
            token = self.tokenizer.convert_ids_to_tokens([i])[0]
            joined = self.tokenizer.convert_tokens_to_string([self.anchor, token])
            alone = self.tokenizer.convert_tokens_to_string([token])
            self.known[i] = joined[len(self.base) :] if joined.startswith(self.base) else alone
        pieces = [self.known[i] for i in ids]
        return pieces if self.clean is None else _without_cleaned_spaces(pieces, self.clean)


def _without_cleaned_spaces(pieces: list[str], clean: Any) -> list[str]:
    """pieces with the spaces clean (which only deletes spaces: ' .' to '.', " ' " to "'")
    removes from their join, each left in the piece it came from."""
    joined = "".join(pieces)
    target = clean(joined)
    if target == joined:
        return pieces
    j, out = 0, []
    for piece in pieces:
        if target.startswith(piece, j):  # most pieces: untouched
            out.append(piece)
            j += len(piece)
            continue
        kept = []
        for c in piece:
            if j < len(target) and target[j] == c:
                kept.append(c)
                j += 1
            # else: a space the cleanup removed
        out.append("".join(kept))
    return out


def output_effect(
    model: nn.Module, directions: Tensor, count: int = EFFECT_TOKENS
) -> tuple[dict, Tensor, Tensor, Tensor, Tensor] | tuple[dict, None, None, None, None]:
    """(about, top values, top ids, bottom values, bottom ids), each (s, count), for decoder
    directions (s, d); about says which effect (the module docstring) or why there is none.
    Bottom is empty (s, 0) for input-embedding cosines."""
    d = directions.shape[1]
    out = getattr(model, "get_output_embeddings", lambda: None)()
    causal = is_causal_lm(getattr(model, "config", None), [type(model).__name__])
    if causal and out is not None and out.weight.shape[1] == d:
        about = {
            "kind": "unembedding_logits",
            "label": "tokens the direction promotes and suppresses through the unembedding",
        }
        table, rows, both = out.weight.detach().float(), directions.float(), True
    else:
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        if emb is None or emb.weight.shape[1] != d:
            width = "none" if emb is None else emb.weight.shape[1]
            return (
                {
                    "kind": "none",
                    "label": f"no output-side effect: the model's embeddings have width {width}, "
                    f"the hook {d}",
                },
                None,
                None,
                None,
                None,
            )
        about = {
            "kind": "input_embedding_cosine",
            "label": "input-embedding tokens nearest the direction by cosine (the model "
            "has no unembedding at this width: not an output effect)",
        }
        table, rows, both = unit_rows(emb.weight), unit_rows(directions), False
    rows = rows.to(table.device)
    count = min(count, table.shape[0])
    parts = []
    for _, block in cosine_blocks(rows, table, EFFECT_BLOCK):
        hi = block.topk(count, dim=1)
        lo = block.topk(count if both else 0, dim=1, largest=False)
        parts.append((hi.values, hi.indices, lo.values, lo.indices))
    hi_v, hi_i, lo_v, lo_i = (torch.cat(p).cpu() for p in zip(*parts, strict=True))
    return about, hi_v, hi_i, lo_v, lo_i


def cofiring(stats: FeatureStats, count: int = NEIGHBOURS) -> list[list[dict]]:
    """Per shown feature, the latents that co-fire most (the module docstring): index, jaccard,
    given (the estimated P(g | f))."""
    m = stats.firings.numel()
    density = stats.firings.double().cpu() / max(stats.n_tokens, 1)
    filled = stats.sample.filled().cpu()
    latents = stats.sample.payload["cofire"].cpu()
    features = stats.features.cpu()
    row = torch.arange(len(features))[:, None, None].expand_as(latents)
    ok = filled[..., None] & (latents >= 0) & (latents != features[row])
    keys, counts = torch.unique(row[ok] * m + latents[ok], return_counts=True)
    r, g = keys // m, keys % m
    given = counts.double() / filled.sum(1).clamp_min(1)[r]
    d_f, d_g = density[features[r]], density[g]
    # The sample's estimate can exceed what either density allows: clamp it to both.
    joint = torch.minimum(d_f * given, torch.minimum(d_f, d_g))
    jaccard = joint / (d_f + d_g - joint).clamp_min(1e-30)
    order, rank = rank_within(r, jaccard)
    found: list[list[dict]] = [[] for _ in range(len(features))]
    for k in order[rank < count].tolist():
        found[int(r[k])].append(
            {"index": int(g[k]), "jaccard": jaccard[k].item(), "given": given[k].item()}
        )
    return found


def _example(pieces: TokenPieces, ids: Tensor, acts: Tensor) -> dict:
    """A context (ids, acts: (WIDTH,), -1 ids outside the window) as the schema's example."""
    inside = (ids >= 0).nonzero().squeeze(1)
    values = acts[inside].tolist()
    centre = int((inside == BEFORE).nonzero()[0, 0])
    return {
        "tokens": pieces(ids[inside].tolist()),
        "values": [significant(v) if v else 0.0 for v in values],  # mostly zeros: skip them
        "token_index": centre,
        "value": significant(values[centre]),
    }


def distinct_contexts(ids: Tensor, limit: int) -> list[int]:
    """The first `limit` rows of ids (c, WIDTH; -1 outside the window, best first) that repeat
    no row kept before them: neither the same tokens (a boilerplate line met twice) nor the same
    passage with the highlight moved by up to AFTER tokens (a run of half the width or more
    shown in both, at most AFTER places apart)."""
    kept: list[int] = []
    rows: set[tuple[int, ...]] = set()
    runs: dict[tuple[int, ...], list[int]] = {}  # a kept row's runs -> their positions
    for i, row in enumerate(ids.tolist()):
        if len(kept) == limit:
            break
        mine = [(p, tuple(row[p : p + _RUN])) for p in range(WIDTH - _RUN + 1)]
        mine = [(p, run) for p, run in mine if min(run) >= 0]
        if tuple(row) in rows or any(
            abs(p - q) <= AFTER for p, run in mine for q in runs.get(run, ())
        ):
            continue
        kept.append(i)
        rows.add(tuple(row))
        for p, run in mine:
            runs.setdefault(run, []).append(p)
    return kept


def significant(value: float, digits: int = 5) -> float:
    """value to `digits` significant digits: small activations keep their size."""
    return float(f"{value:.{digits}g}")


def _summary(examples: list[dict]) -> str:
    """The most common tokens of the examples' own tokens: 'def ×4, class ×2'."""
    tokens = Counter(
        e["tokens"][e["token_index"]].strip() or repr(e["tokens"][e["token_index"]])
        for e in examples
    )
    return ", ".join(f"{t} ×{c}" if c > 1 else t for t, c in tokens.most_common(SUMMARY_TOKENS))


def _histogram(stats: FeatureStats, row: int) -> dict:
    """The feature's activation histogram: counts of bins [i w, (i + 1) w) from 0, w the
    bin_width, trailing empty bins left out."""
    counts = stats.histogram.counts[row].cpu()
    used = int(counts.nonzero().max()) + 1 if counts.any() else 0
    width = stats.histogram.upper()[row].item() / stats.histogram.bins
    return {"bin_width": width, "counts": counts[:used].tolist()}


def _quantiles(stats: FeatureStats, row: int, pieces: TokenPieces) -> list[dict]:
    filled = stats.sample.filled()[row].cpu()
    ids = stats.sample.payload["ids"][row].cpu()[filled]
    acts = stats.sample.payload["acts"][row].cpu()[filled]
    order = torch.argsort(acts[:, BEFORE], descending=True, stable=True)
    groups = []
    for q in range(QUANTILES):
        # Group 0 is the top quantile: ranks [q n / Q, (q + 1) n / Q) of the sorted sample.
        lo, hi = q * len(order) // QUANTILES, (q + 1) * len(order) // QUANTILES
        members = order[lo:hi]
        if members.numel() == 0:
            continue
        step = max(1, members.numel() // QUANTILE_EXAMPLES)
        chosen = members[::step][:QUANTILE_EXAMPLES]
        values = acts[members, BEFORE]
        groups.append(
            {
                "quantile": [1 - (q + 1) / QUANTILES, 1 - q / QUANTILES],
                "value_range": [significant(values.min().item()), significant(values.max().item())],
                "sampled": members.numel(),
                "examples": [_example(pieces, ids[i], acts[i]) for i in chosen.tolist()],
            }
        )
    return groups


def feature_records(
    stats: FeatureStats,
    W_dec: Tensor,
    model: nn.Module,
    tokenizer: Any,
    about: dict,
    progress: Any = None,
    extra: Callable[[int], dict] | None = None,
) -> tuple[list[dict], dict]:
    """(records, effect): one schema record per shown feature, in stats.features order, and
    what the output-side effect is (kind, label). about: the SAE, model, hook and text;
    progress: a tqdm-like bar updated once per record, or None; extra(latent): more fields
    of a latent's record (a CLT feature's decoder norm per target layer)."""
    pieces = TokenPieces(tokenizer)
    features = stats.features.cpu()
    near_cos, near = nearest_rows(W_dec, features, NEIGHBOURS)
    effect, hi_v, hi_i, lo_v, lo_i = output_effect(model, W_dec.detach()[features.to(W_dec.device)])
    fires = cofiring(stats)
    top_filled = stats.top.filled().cpu()
    top_ids, top_acts = (stats.top.payload[k].cpu() for k in ("ids", "acts"))
    records = []
    for row, latent in enumerate(features.tolist()):
        firings = int(stats.firings[latent])
        filled = top_filled[row].nonzero().squeeze(1)
        chosen = filled[distinct_contexts(top_ids[row, filled], TOP_EXAMPLES)]
        examples = [_example(pieces, top_ids[row, j], top_acts[row, j]) for j in chosen.tolist()]
        record = {
            "schema": SCHEMA,
            **about,
            "index": latent,
            "tokens_seen": stats.n_tokens,
            "firings": firings,
            "density": firings / max(stats.n_tokens, 1),
            "max_activation": float(stats.peak[latent]),
            "mean_activation": float(stats.total[latent]) / firings if firings else 0.0,
            "summary": _summary(examples),
            "histogram": _histogram(stats, row),
            "top_examples": examples,
            "quantile_examples": _quantiles(stats, row, pieces),
            "nearest_decoder": [
                {"index": int(i), "cosine": significant(c)}
                for c, i in zip(near_cos[row].tolist(), near[row].tolist(), strict=True)
            ],
            "cofiring": fires[row],
            "output_effect": {**effect, "positive": [], "negative": []},
        }
        if hi_v is not None:
            for side, values, ids in (("positive", hi_v, hi_i), ("negative", lo_v, lo_i)):
                tokens = pieces(ids[row].tolist())
                record["output_effect"][side] = [
                    {"token": t, "value": significant(v)}
                    for t, v in zip(tokens, values[row].tolist(), strict=True)
                ]
        if extra is not None:
            record.update(extra(latent))
        records.append(record)
        if progress is not None:
            progress.update(1)
    return records, effect


def clt_decoder_norms(clt: CrossLayerTranscoder, layer: int) -> Callable[[int], dict]:
    """extra for the dashboard of a CLT's layer: each feature's decoder norm to that layer
    and every later one ("decoder_norms": target layer, its output hook point, norm)."""
    norms = clt.W_dec[layer].detach().double().norm(dim=-1).cpu()  # (m, L - layer)

    def extra(latent: int) -> dict:
        rows = [
            {"target": target, "hook": recorded_hook(clt.provenance, "hooks_out", target),
             "norm": significant(norm)}
            for target, norm in enumerate(norms[latent].tolist(), start=layer)
        ]  # fmt: skip
        return {"clt_layer": layer, "decoder_norms": rows}

    return extra


def pick_latents(spec: str, n_latents: int, seed: int = 0) -> Tensor:
    """The latents a --features spec names (sorted): 'all'; a count N, N latents drawn at
    random (seeded); or ids and ranges, '3,17,100-120'. ValueError says what is wrong."""
    spec = spec.strip()
    if spec == "all":
        return torch.arange(n_latents)
    if is_natural(spec):
        count = int(spec)
        if not 0 < count <= n_latents:
            raise ValueError(f"a count of features must be in 1..{n_latents}, got {count}")
        drawn = torch.randperm(n_latents, generator=seeded_generator(seed))[:count]
        return drawn.sort().values
    picked: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not is_natural(lo) or (dash and not is_natural(hi)):
            raise ValueError(f"expected 'all', a count or ids like 3,17,100-120, got {spec!r}")
        first, last = int(lo), int(hi or lo)
        if first > last or last >= n_latents:
            raise ValueError(f"{part.strip()!r} is not a range of latents 0..{n_latents - 1}")
        picked.update(range(first, last + 1))
    return torch.tensor(sorted(picked), dtype=torch.int64)


def write_feature_dashboard(
    stats: FeatureStats,
    sae: SparseAutoencoder,
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    about: dict,
    context_size: int,
    neuronpedia: str | None = None,
    pages: Any = None,
    extra: Callable[[int], dict] | None = None,
) -> tuple[dict, list[dict]]:
    """Write the dashboard folder out (dashboard_html.py) of a finished pass; returns its meta
    (dashboard.json) and the records. about: sae, model, hook, text. neuronpedia: a source
    set name, to write Neuronpedia's batch files too (neuronpedia.py). pages: a tqdm-like bar
    of 2 steps per feature (its record, its pages), or None; extra: as feature_records'."""
    records, effect = feature_records(stats, sae.W_dec, model, tokenizer, about, pages, extra)
    meta = {
        **about,
        "schema": SCHEMA,
        "tokens_seen": stats.n_tokens,
        "n_latents": sae.n_latents,
        "shown": stats.features.numel(),
        "context_size": context_size,
        "output_effect": effect,
        "density_histogram": density_histogram(stats.firings, stats.n_tokens),
    }
    extra = neuronpedia_files(records, meta, neuronpedia) if neuronpedia else None
    write_dashboard(out, records, meta, extra, pages)
    return meta, records


def build_dashboard(
    sae: SparseAutoencoder,
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    about: dict,
    features: Tensor,
    *,
    context_size: int,
    max_tokens: int | None,
    batch_size: int = 32,
    progress: Any = None,
    neuronpedia: str | None = None,
    pages: Any = None,
    extra: Callable[[int], dict] | None = None,
) -> tuple[dict, list[dict]]:
    """Stream the SAE over about["text"] at about["hook"] and write the dashboard folder out;
    returns its meta (dashboard.json) and records. about: sae, model, hook, text; progress:
    a bar of the pass's tokens; neuronpedia, pages and extra: as write_feature_dashboard's."""
    stats = collect_feature_stats(
        sae, model, tokenizer, about["hook"], about["text"], features,
        context_size=context_size, max_tokens=max_tokens, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    return write_feature_dashboard(
        stats, sae, model, tokenizer, out, about, context_size, neuronpedia, pages, extra
    )
