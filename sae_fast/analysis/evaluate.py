"""Evaluation of a trained SAE: reconstruction and latent statistics on held-out activations,
and the language-model loss with the SAE spliced in (CE loss recovered).
"""

from __future__ import annotations

from contextlib import nullcontext
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from ..sae import SparseAutoencoder, eval_mode
from ..sources.base import ActivationSource, SourceError
from ..sources.hooks import is_causal_lm, model_device, splice
from ..sources.model import pad_windows, token_windows
from ..sources.text import documents
from ..training.metrics import active_latents, firing_counts
from ..validation import check_int
from .steering import attach


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    source: ActivationSource,
    tokens: int,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
) -> dict[str, float]:
    """mse, fvu, l0, dead and dense latent fractions of sae over `tokens` rows of source.

    FVU divides the summed squared error by the summed squared deviation from the mean of
    all rows seen; a latent is dead here when it fired on none of them.
    """
    return evaluate_with_frequencies(sae, source, tokens, batch_size, dense_threshold)[0]


def evaluate_with_frequencies(
    sae: SparseAutoencoder,
    source: ActivationSource,
    tokens: int,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
) -> tuple[dict[str, float], Tensor]:
    """evaluate's metrics and, from the same pass, each latent's firing frequency (m,)."""
    for name, value in (("tokens", tokens), ("batch_size", batch_size)):
        check_int(value, name, error=SourceError)
    if source.d_in != sae.d_in:
        raise SourceError(f"the activations have d_in={source.d_in} but the SAE has {sae.d_in}")
    param = sae.W_dec
    counts = torch.zeros(sae.n_latents, dtype=torch.int64, device=param.device)
    sq_err = active = sq_norm = 0.0
    total = torch.zeros(sae.d_in, dtype=torch.float64, device=param.device)
    seen = 0
    while seen < tokens:
        raw = source.next_batch(min(batch_size, tokens - seen)).to(param.device)
        with eval_mode(sae):
            out = sae(raw.to(param.dtype))
        counts += firing_counts(out.code, sae.n_latents)
        # Errors against the activations as the source gives them, not as rounded to the
        # SAE's dtype: a bf16 SAE is charged for the rounding of its input too.
        x64 = raw.double()
        sq_err += (x64 - out.x_hat.double()).pow(2).sum().item()
        sq_norm += x64.pow(2).sum().item()
        total += x64.sum(dim=0)
        active += active_latents(out.code).sum().item()
        seen += raw.shape[0]
    variance = sq_norm - total.pow(2).sum().item() / seen
    freq = counts.double() / seen
    metrics = {
        "tokens": seen,
        "mse": sq_err / (seen * sae.d_in),
        "fvu": sq_err / variance,
        "l0": active / seen,
        "dead_fraction": (counts == 0).double().mean().item(),
        "dense_fraction": (freq > dense_threshold).double().mean().item(),
    }
    return metrics, freq.cpu()


def _next_token_loss(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) over the unpadded positions."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
    )
    return loss.item(), int((labels != -100).sum())


def check_causal_lm(model: nn.Module) -> None:
    """Raise SourceError unless model predicts the next token (a causal LM with its head).

    A masked LM has a language-model head too, but its logits at a position are not a
    next-token prediction, so its "next-token loss" would mean nothing.
    """
    name = type(model).__name__
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise SourceError(
            f"CE loss recovered needs a causal language model; {name} has no language-model head"
        )
    if not is_causal_lm(getattr(model, "config", None), [name]):
        raise SourceError(
            f"CE loss recovered needs a causal language model; {name} does not predict the "
            "next token"
        )


@torch.no_grad()
def ce_loss_recovered(
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    sae: SparseAutoencoder,
    documents_spec: str,
    context_size: int = 128,
    batch_size: int = 16,
    max_windows: int = 64,
) -> dict[str, float]:
    """Next-token loss of a causal LM clean, with the SAE's reconstruction spliced in at hook,
    and with the hook's output zeroed; ce_recovered = (zero - sae) / (zero - clean).
    """
    check_causal_lm(model)
    variants = {
        "clean": nullcontext,
        "sae": lambda: attach(model, hook, sae),  # the reconstruction replaces the output
        "zero_ablated": lambda: splice(model, hook, torch.zeros_like),
    }
    sums = dict.fromkeys(variants, 0.0)
    count = 0
    windows = token_windows(tokenizer, documents(documents_spec), context_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    taken = 0
    while taken < max_windows:
        batch = list(islice(windows, min(batch_size, max_windows - taken)))
        if not batch:
            break
        taken += len(batch)
        ids, mask = (t.to(device) for t in pad_windows(batch, pad))
        for name, context in variants.items():
            with context():
                loss, n = _next_token_loss(model, ids, mask)
            sums[name] += loss
        count += n
    if count == 0:
        raise SourceError(f"text source {documents_spec!r} gave no tokens to predict")
    result = {f"ce_loss_{name}": total / count for name, total in sums.items()}
    gap = result["ce_loss_zero_ablated"] - result["ce_loss_clean"]
    result["ce_recovered"] = (result["ce_loss_zero_ablated"] - result["ce_loss_sae"]) / gap
    result["ce_tokens"] = count
    return result
