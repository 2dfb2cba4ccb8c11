"""Several hook points' activations stacked layer by layer, from one model pass per batch of
windows: what a cross-layer transcoder reads (every layer's MLP input) and writes (every
layer's MLP output)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import SourceError
from .hooks import probe_hooks
from .model import model_activations, token_windows


def stacked_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    hooks: Sequence[Sequence[str]],
    max_tokens: int | None = None,
    context_size: int = 64,
) -> list[Tensor]:
    """For each group of hook points in hooks (e.g. the MLP inputs of layers 0..L-1, then
    their outputs), their activations at the texts' tokens stacked: (L, tokens, d) each.

    The texts run as windows of context_size tokens (sources.model.token_windows; padding
    and special tokens left out), every group from the same model passes, until max_tokens
    tokens are in (None: all of the texts).
    """
    names = [name for group in hooks for name in group]
    rows, tokens = [], 0
    windows = token_windows(tokenizer, texts, context_size)
    for _, acts in model_activations(model, tokenizer, names, windows):
        rows.append(acts)
        tokens += len(acts)
        if max_tokens is not None and tokens >= max_tokens:
            break
    if not tokens:
        raise SourceError("the text holds no tokens to read activations from")
    widths = [probe.shape[-1] for probe in probe_hooks(model, names)]
    columns = torch.cat(rows)[:max_tokens].split(widths, dim=1)
    stacks, start = [], 0
    for group in hooks:
        part = columns[start : start + len(group)]
        if len({t.shape[1] for t in part}) > 1:
            raise SourceError(f"hook points {list(group)} differ in width: {widths}")
        stacks.append(torch.stack(part))
        start += len(group)
    return stacks
