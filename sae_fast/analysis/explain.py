"""Per-token explanations: which latents fired on each token of a text, with their values
and, from a reference corpus, what each of those latents fires on most."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..sae import SparseAutoencoder, eval_mode
from ..sources.model import model_activations, token_windows
from .features import Activations, active_entries


@dataclass
class TokenFeatures:
    """token: its text as the tokenizer spells it; features: (latent, value), largest first."""

    token: str
    features: list[tuple[int, float]]


@torch.no_grad()
def explain_text(
    sae: SparseAutoencoder,
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    text: str,
    context_size: int = 128,
    top: int = 5,
) -> list[TokenFeatures]:
    """The top latents of each token of text (special tokens left out), in windows of
    context_size tokens as the trainer reads text."""
    rows = []
    param = sae.W_dec
    for ids, acts in model_activations(
        model, tokenizer, hook, token_windows(tokenizer, [text], context_size)
    ):
        with eval_mode(sae):
            code = sae.encode(acts.to(param.device, param.dtype))
        value, latent, position = active_entries(code)
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        for t, token in enumerate(tokens):
            mine = position == t
            order = value[mine].argsort(descending=True, stable=True)[:top]
            pairs = [(int(latent[mine][i]), value[mine][i].item()) for i in order]
            rows.append(TokenFeatures(tokenizer.convert_tokens_to_string([token]), pairs))
    return rows


def summaries(acts: Activations, tokenizer: Any, latents: list[int], count: int = 3) -> dict:
    """For each latent, the tokens of its count largest activations in acts: 'a, b, c'."""
    found = {}
    for latent in latents:
        top = acts.top(latent, count)
        words = [
            tokenizer.convert_tokens_to_string(
                tokenizer.convert_ids_to_tokens([acts.windows[w][p]])
            ).strip()
            for _, w, p in top
        ]
        found[latent] = ", ".join(words) if words else "(silent on the reference text)"
    return found


def feature_text(row: TokenFeatures, notes: dict[int, str]) -> str:
    """A token's latents as one line: 'latent:value [what it fires on]', largest first."""
    return "  ".join(
        f"{i}:{v:.2f}" + (f" [{notes[i]}]" if i in notes else "") for i, v in row.features
    )


def explain_html(
    rows: list[TokenFeatures],
    notes: dict[int, str],
    title: str,
    links: dict[int, str] | None = None,
) -> str:
    """A static page: the text with each token shaded by its largest activation (hover for
    its latents), then a table of every token's latents with their summaries; links: latent ->
    the address of its dashboard page (escaped), for the latents that have one."""
    peak = max((f[0][1] for f in (r.features for r in rows) if f), default=1.0) or 1.0
    links = links or {}

    def cell(row: TokenFeatures) -> str:
        return "&nbsp; ".join(
            (f"<a href='{links[i]}'>{i}</a>" if i in links else str(i))
            + f":{v:.2f}"
            + (html.escape(f" [{notes[i]}]") if i in notes else "")
            for i, v in row.features
        )

    described = [html.escape(feature_text(r, notes), quote=True) for r in rows]
    spans = "".join(
        f"<span title='{text}' style='background: rgba(255, 120, 0, "
        f"{(r.features[0][1] / peak) if r.features else 0:.2f})'>{html.escape(r.token)}</span> "
        for r, text in zip(rows, described, strict=True)
    )
    table = "".join(
        f"<tr><td>{i}</td><td>{html.escape(r.token)}</td><td>{cell(r) or '-'}</td></tr>"
        for i, r in enumerate(rows)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".text span{padding:1px 2px;border-radius:3px}td{padding:2px 8px;vertical-align:top}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='text'>{spans}</p>"
        f"<table><tr><th>#</th><th>token</th><th>latents (value, what they fire on)</th></tr>"
        f"{table}</table></body></html>\n"
    )
