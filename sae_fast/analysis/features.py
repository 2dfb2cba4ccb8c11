"""Feature dashboards: the token contexts on which chosen latents activate most."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import SparseCode
from ..sae import SparseAutoencoder, eval_mode
from ..sources.model import model_activations, token_windows
from ..sources.text import documents


@dataclass
class Activations:
    """Every nonzero latent activation over a set of text windows.

    windows: the token ids of each window (special tokens removed); value, latent, window,
    position: one entry per (token, active latent), flat tensors of equal length.
    """

    windows: list[list[int]]
    value: Tensor
    latent: Tensor
    window: Tensor
    position: Tensor
    n_tokens: int

    def frequencies(self, n_latents: int) -> Tensor:
        """(m,) fraction of the tokens on which each latent fired."""
        return torch.bincount(self.latent, minlength=n_latents).double() / max(self.n_tokens, 1)

    def top(self, latent: int, count: int) -> list[tuple[float, int, int]]:
        """(value, window, position) of the latent's `count` largest activations."""
        hits = (self.latent == latent).nonzero().squeeze(1)
        best = hits[self.value[hits].argsort(descending=True, stable=True)[:count]]
        return [(self.value[i].item(), int(self.window[i]), int(self.position[i])) for i in best]


def active_entries(code: SparseCode | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(value, latent, token position) of each active latent.  code: (t, k) or (t, m)."""
    if isinstance(code, SparseCode):
        pos = torch.arange(code.values.shape[0], device=code.values.device)
        pos = pos.unsqueeze(1).expand_as(code.values)
        keep = code.values > 0
        return code.values[keep], code.indices[keep], pos[keep]
    pos, latent = (code > 0).nonzero(as_tuple=True)
    return code[pos, latent], latent, pos


def active_rows(code: SparseCode | Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices): (n, w) each row's active latents (float values; zeros where a row
    has fewer than the widest).  code: (n, k) or (n, m)."""
    if isinstance(code, SparseCode):
        return code.values.float(), code.indices
    width = max(int((code > 0).sum(1).max()), 1) if code.numel() else 1
    top = code.float().topk(min(width, code.shape[1]), dim=1)
    return top.values.clamp_min(0), top.indices


@torch.no_grad()
def collect_activations(
    sae: SparseAutoencoder,
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    documents_spec: str,
    context_size: int = 64,
    max_windows: int | None = 256,
    batch_size: int = 32,
    max_tokens: int | None = None,
    progress: Any = None,
) -> Activations:
    """The SAE's latents on the first windows of documents_spec at hook.

    It stops after max_windows windows, or once max_tokens tokens (special tokens not
    counted) have been seen, whichever comes first; None sets no limit. progress: a
    tqdm-like bar updated by tokens, or None.
    """
    param = sae.W_dec
    windows = token_windows(tokenizer, documents(documents_spec), context_size)
    kept: list[list[int]] = []
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    rows = model_activations(model, tokenizer, hook, islice(windows, max_windows), batch_size)
    n_tokens = 0
    for ids, acts in rows:
        if max_tokens is not None and n_tokens >= max_tokens:
            break
        with eval_mode(sae):
            code = sae.encode(acts.to(param.device, param.dtype))
        value, latent, pos = active_entries(code)
        window = torch.full_like(latent, len(kept))
        parts.append((value.float().cpu(), latent.cpu(), window.cpu(), pos.cpu()))
        kept.append(ids.tolist())
        n_tokens += ids.numel()
        if progress is not None:
            progress.update(ids.numel())
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return Activations(kept, empty.float(), empty, empty, empty, 0)
    value, latent, window, position = (torch.cat(t) for t in zip(*parts, strict=True))
    return Activations(kept, value, latent, window, position, n_tokens)


def pick_features(frequencies: Tensor, count: int) -> list[int]:
    """count latents spread over the firing-frequency range of those that fired.

    The most frequent latents are often near-dense and the rarest fire on a token or two, so
    the picks are evenly spaced between the 10th and 90th percentile of frequency.
    """
    alive = (frequencies > 0).nonzero().squeeze(1)
    if alive.numel() == 0 or count < 1:
        return []
    order = alive[frequencies[alive].argsort(descending=True, stable=True)]
    lo, hi = int(0.1 * len(order)), max(int(0.9 * len(order)), int(0.1 * len(order)) + 1)
    span = order[lo:hi]
    if count >= len(span):
        return [int(i) for i in span]
    if count == 1:
        return [int(span[len(span) // 2])]
    # Both ends and count - 2 evenly spaced between: the spacing is >= 1, so no repeats.
    return [int(span[i * (len(span) - 1) // (count - 1)]) for i in range(count)]


def context(
    tokenizer: Any, ids: list[int], position: int, before: int = 10, after: int = 4
) -> tuple[str, str, str]:
    """(left, token, right) text around ids[position], as the tokenizer spells the tokens."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    left = tokenizer.convert_tokens_to_string(tokens[max(0, position - before) : position])
    right = tokenizer.convert_tokens_to_string(tokens[position + 1 : position + 1 + after])
    return left, tokenizer.convert_tokens_to_string([tokens[position]]), right
