"""One streaming pass of an SAE over a text: what a feature dashboard shows of each latent.

Memory is bounded by the number of features shown, not by the text: per feature its
TOP_HELD largest activations and a uniform sample of SAMPLE_SIZE of its firings (both
with their contexts, BEFORE tokens before and AFTER after, each token's activation of the
feature; the sample also with the other latents active on its token, for co-firing: all k
of a TopK code, the largest max(DENSE_SLOTS, 2k) of other codes), and an
exact activation histogram whose bins double with the feature's largest value. Firing
counts, sums and maxima are kept for every latent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import SparseCode
from ..sae import SparseAutoencoder, eval_mode
from ..sources.model import model_activations, special_tokens, token_windows
from ..sources.seeds import seeded_generator
from ..sources.text import documents
from .best_k import BestK
from .features import active_entries, active_rows

TOP_EXAMPLES = 16  # shown per feature, distinct (dashboard.distinct_contexts)
TOP_HELD = 2 * TOP_EXAMPLES  # held, so that repeats of a passage leave enough
SAMPLE_SIZE = 32
BEFORE, AFTER = 16, 8  # context tokens around an example's token
WIDTH = BEFORE + 1 + AFTER
HIST_BINS = 64
DENSE_SLOTS = 64  # co-firing slots per token for SAEs other than TopK (at least 2k)
CONTEXT_CHUNK = 4096  # examples whose contexts are looked up at a time
_MIN_EXP = -24  # a histogram's first range is [0, 2^-24): below any activation in practice


class DoublingHistogram:
    """Per row, counts of values in `bins` equal bins over [0, 2^exp[row]).

    exp grows with the row's largest value; each doubling sums neighbouring bins in pairs, so
    the counts stay exact and the bins span at most twice the row's maximum.
    """

    def __init__(self, rows: int, bins: int, device: torch.device | str) -> None:
        if bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(rows, bins, dtype=torch.int64, device=device)
        self.exp = torch.full((rows,), _MIN_EXP, dtype=torch.int64, device=device)

    def add(self, row: Tensor, value: Tensor) -> None:
        """Count values (c,) > 0 in their rows (c,)."""
        if row.numel() == 0:
            return
        peak = torch.zeros(self.exp.shape, device=value.device, dtype=torch.float32)
        peak.scatter_reduce_(0, row, value.float(), "amax")
        need = torch.where(peak > 0, torch.log2(peak.clamp_min(1e-30)).ceil().long(), _MIN_EXP)
        grown = torch.maximum(self.exp, need)
        delta = grown - self.exp
        top = int(math.log2(self.bins))
        for d in torch.unique(delta[delta > 0]).tolist():
            rows = (delta == d).nonzero().squeeze(1)
            f = 1 << min(d, top)
            merged = self.counts[rows].view(rows.numel(), self.bins // f, f).sum(-1)
            self.counts[rows] = torch.cat(
                [merged, merged.new_zeros(rows.numel(), self.bins - self.bins // f)], 1
            )
        self.exp = grown
        width = torch.pow(2.0, self.exp[row].double()) / self.bins
        b = (value.double() / width).floor().long().clamp_(0, self.bins - 1)
        self.counts.view(-1).index_add_(0, row * self.bins + b, torch.ones_like(b))

    def upper(self) -> Tensor:
        """(rows,) float64: each row's range end 2^exp."""
        return torch.pow(2.0, self.exp.double())


class FeatureStatsError(ValueError):
    """The pass cannot describe these activations: no tokens, or values that are not finite."""


def _latent_values(code: SparseCode | Tensor, tokens: Tensor, latent: Tensor) -> Tensor:
    """(c, w): the activation of latent[i] (c,) at each of tokens[i] (c, w)."""
    if not isinstance(code, SparseCode):
        return code[tokens, latent[:, None]].float()
    # A TopK code holds k latents a token: look for latent[i] among them, in chunks, since
    # a batch's first examples are nearly all its firings and (c, w, k) would be gigabytes.
    found = []
    for part in torch.arange(tokens.shape[0], device=tokens.device).split(CONTEXT_CHUNK):
        hit = code.indices[tokens[part]] == latent[part, None, None]
        found.append(torch.where(hit, code.values[tokens[part]].float(), 0.0).sum(-1))
    return torch.cat(found) if found else tokens.new_zeros(tokens.shape, dtype=torch.float32)


def _contexts(
    code: SparseCode | Tensor, ids: Tensor, start: Tensor, token: Tensor, latent: Tensor
) -> dict[str, Tensor]:
    """The contexts of examples (token, latent: (c,)) in a batch of ids (n,) whose windows
    start at start (n,): ids (c, WIDTH), -1 outside the token's window, and acts (c, WIDTH),
    the latent's activation on each."""
    n = ids.numel()
    at = token[:, None] + torch.arange(-BEFORE, AFTER + 1, device=ids.device)
    clamped = at.clamp(0, n - 1)
    inside = (at >= 0) & (at < n) & (start[clamped] == start[token, None])
    return {
        "ids": torch.where(inside, ids[clamped], -1),
        "acts": torch.where(inside, _latent_values(code, clamped, latent), 0.0),
    }


def _active_latents(code: SparseCode | Tensor, tokens: Tensor, slots: int) -> Tensor:
    """(c, slots): the latents active on each of tokens (c,), the largest first where more
    fired (a BatchTopK code's width is its batch's widest row), -1 where fewer."""
    rows = (
        SparseCode(code.values[tokens], code.indices[tokens])
        if isinstance(code, SparseCode)
        else code[tokens]
    )
    values, indices = active_rows(rows)
    if values.shape[1] > slots:
        values, where = values.topk(slots, dim=1)
        indices = indices.gather(1, where)
    found = torch.where(values > 0, indices, -1)
    return torch.nn.functional.pad(found, (0, slots - found.shape[1]), value=-1)


def text_tokens(tokenizer: Any, text: str, context_size: int) -> int:
    """How many tokens text_batches gives over the whole of text (special tokens left out):
    a progress bar's total, from one pass of the tokenizer alone."""
    prefix, suffix = special_tokens(tokenizer)
    windows = token_windows(tokenizer, documents(text), context_size)
    return sum(len(window) - len(prefix) - len(suffix) for window in windows)


def text_batches(
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    text: str,
    context_size: int,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(ids: (n,), acts: (n, d), start: (n,) the index in the batch where each token's window
    starts), batch_size windows of text at a time (special tokens left out), up to max_tokens
    tokens in all (None: the whole text)."""
    windows = token_windows(tokenizer, documents(text), context_size)
    held: list[tuple[Tensor, Tensor]] = []
    seen = 0
    for item in model_activations(model, tokenizer, hook, windows, batch_size):
        held.append(item)
        seen += item[0].numel()
        full = max_tokens is not None and seen >= max_tokens
        if len(held) == batch_size or full:
            ids, acts, start = _flatten(held)
            keep = ids.numel() - (seen - max_tokens if full else 0)
            yield ids[:keep], acts[:keep], start[:keep]
            held = []
        if full:
            return
    if held:
        yield _flatten(held)


def _flatten(held: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.cat([i for i, _ in held])
    acts = torch.cat([a for _, a in held])
    lengths = torch.tensor([i.numel() for i, _ in held])
    starts = torch.cumsum(lengths, 0) - lengths
    return ids, acts, torch.repeat_interleave(starts, lengths)


class FeatureStats:
    """The pass's state and result.

    features: (s,) the latents shown; n_tokens: tokens read; firings, total, peak: (m,) per
    latent, its firings and the sum and max of its activations; top, sample: BestK over the s
    features (payload ids, acts: (s, size, WIDTH); sample also cofire: (s, size, slots), the
    latents active on the example's token, -1 for none); histogram: over the s features.
    """

    def __init__(
        self,
        n_latents: int,
        features: Tensor,
        slots: int,
        device: torch.device | str,
        seed: int = 0,
    ) -> None:
        self.features = features
        self.n_tokens = 0
        self.slots = slots
        self.row_of = torch.full((n_latents,), -1, dtype=torch.int64, device=device)
        self.row_of[features.to(device)] = torch.arange(features.numel(), device=device)
        context = {"ids": ((WIDTH,), torch.int64), "acts": ((WIDTH,), torch.float32)}
        s = features.numel()
        self.top = BestK(s, TOP_HELD, context, device)
        self.sample = BestK(s, SAMPLE_SIZE, {**context, "cofire": ((slots,), torch.int64)}, device)
        self.histogram = DoublingHistogram(s, HIST_BINS, device)
        self.firings = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.total = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.peak = torch.zeros(n_latents, dtype=torch.float32, device=device)
        self.keys = seeded_generator(seed, device=device)

    @classmethod
    def of(cls, sae: SparseAutoencoder, features: Tensor, seed: int = 0) -> FeatureStats:
        """Empty statistics of the SAE's latents features (s,) on the SAE's device."""
        # A TopK code holds every active latent; others keep the largest of each token's.
        wide = max(DENSE_SLOTS, 2 * (sae.k or 0))
        slots = sae.k if sae.activation == "topk" else min(wide, sae.n_latents)
        return cls(sae.n_latents, features, slots, sae.W_dec.device, seed)

    def add(self, ids: Tensor, start: Tensor, code: SparseCode | Tensor) -> None:
        """Count a batch: token ids (n,), window starts (n,) (text_batches) and the SAE's code
        of the tokens ((n, k) or (n, m))."""
        device = self.firings.device
        ids, start = ids.to(device), start.to(device)
        value, latent, token = active_entries(code)
        value = value.float()
        if not torch.isfinite(value).all():
            raise FeatureStatsError(
                "the SAE's activations are not finite (inf or nan): an SAE in float16 can "
                "overflow; load it in float32"
            )
        self.firings += torch.bincount(latent, minlength=self.firings.numel())
        self.total.index_add_(0, latent, value.double())
        self.peak.scatter_reduce_(0, latent, value, "amax")
        row = self.row_of[latent]
        shown = row >= 0
        value, latent, token, row = value[shown], latent[shown], token[shown], row[shown]
        self.histogram.add(row, value)
        pick = self.top.select(row, value)
        context = _contexts(code, ids, start, token[pick], latent[pick])
        self.top.insert(row[pick], value[pick], **context)
        key = torch.rand(value.shape, generator=self.keys, device=device)
        pick = self.sample.select(row, key)
        context = _contexts(code, ids, start, token[pick], latent[pick])
        cofire = _active_latents(code, token[pick], self.slots)
        self.sample.insert(row[pick], key[pick], **context, cofire=cofire)
        self.n_tokens += ids.numel()


@torch.no_grad()
def collect_feature_stats(
    sae: SparseAutoencoder,
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    text: str,
    features: Tensor,
    *,
    context_size: int,
    max_tokens: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: Any = None,
) -> FeatureStats:
    """Stream the SAE's latents over text (a documents spec) at hook.

    features: (s,) the latents to keep examples and histograms of; batch_size: windows per
    model forward; progress: a tqdm-like bar updated by tokens, or None.
    """
    stats = FeatureStats.of(sae, features, seed)
    for ids, acts, start in text_batches(
        model, tokenizer, hook, text, context_size, batch_size, max_tokens
    ):
        with eval_mode(sae):
            code = sae.encode(acts.to(sae.W_dec.device, sae.W_dec.dtype))
        stats.add(ids, start, code)
        if progress is not None:
            progress.update(ids.numel())
    if stats.n_tokens == 0:
        raise FeatureStatsError(f"{text} holds no tokens")
    return stats
