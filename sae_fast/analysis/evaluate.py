"""Evaluation of a trained SAE: reconstruction and latent statistics on held-out activations,
and the language-model loss with the SAE spliced in (CE loss recovered, KL divergence).

The core metrics follow SAEBench's definitions (Karvonen et al. 2025, `sae_bench/evals/core/
main.py` of sae-bench 0.6.0), over the evaluated tokens, each evaluation batch counting as one
of SAEBench's batches:
- explained_variance: SAEBench's current formula, 1 - R / (S - (S / d)^2), where R and S are
  the batch means of ||x - x_hat||^2 and of ||x||^2, averaged over batches. It is not a
  variance ratio: (S / d)^2, the square of the mean of x^2 per dimension, stands where the
  squared mean of x belongs (its quirk), so it comes out higher than 1 - fvu wherever the
  activations have a mean;
- explained_variance_legacy: SAEBench's former formula, the mean over tokens of
  1 - ||x - x_hat||^2 / ||x - mean(x)||^2, the mean taken over the token's batch (per token:
  it depends on the batch size, noisy for small batches);
- fvu (ours): the summed squared error over the summed squared deviation from the mean of all
  tokens, so 1 - fvu is the centred, pooled explained variance;
- cossim: the mean of cos(x, x_hat); l2_norm_in, l2_norm_out: the means of ||x|| and
  ||x_hat||; l2_ratio: the mean of ||x_hat|| / ||x|| (||x|| below 1e-4 counts as 1);
- relative_reconstruction_bias: E[||x_hat||^2] / E[x . x_hat] (Rajamanoharan et al. 2024,
  eq. 10; 1 without shrinkage, below 1 when x_hat is shrunk), pooled over all tokens where
  SAEBench averages it per batch;
- l0: the mean number of active latents, l1: the mean sum of their values; frac_alive: the
  fraction of latents that fired on at least one token; density_histogram (`sae-fast
  eval`'s feature_density_histogram): latents by log10 firing frequency;
- mse is this project's mean over elements of (x - x_hat)^2 (SAEBench divides each token's
  squared error by the number of tokens instead).
KL (ce_loss_recovered): kl_div_with_sae / kl_div_with_ablation, the mean over unpadded
positions of KL(p_clean || p) with the SAE spliced in / the hook zeroed, and kl_div_score =
(kl_ablation - kl_sae) / kl_ablation; ce_loss_score = (ce_ablation - ce_sae) /
(ce_ablation - ce_clean), SAEBench's name for ce_recovered.
"""

from __future__ import annotations

from contextlib import nullcontext
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import SparseCode
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
    progress: Any = None,
) -> dict[str, float]:
    """mse, fvu, SAEBench's core metrics (the module docstring), dead and dense latent
    fractions of sae over `tokens` rows of source, drawn batch_size at a time; progress: a
    tqdm-like bar updated by rows, or None.

    FVU divides the summed squared error by the summed squared deviation from the mean of
    all rows seen; a latent is dead here when it fired on none of them.
    """
    return evaluate_with_frequencies(sae, source, tokens, batch_size, dense_threshold, progress)[0]


def evaluate_with_frequencies(
    sae: SparseAutoencoder,
    source: ActivationSource,
    tokens: int,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    progress: Any = None,
) -> tuple[dict[str, float], Tensor]:
    """evaluate's metrics and, from the same pass, each latent's firing frequency (m,).

    A transcoder's source gives its input and output activations side by side (d_in +
    d_out), and the metrics are those of its prediction of the output."""
    for name, value in (("tokens", tokens), ("batch_size", batch_size)):
        check_int(value, name, error=SourceError)
    width = sae.d_in + sae.d_out if sae.transcoder else sae.d_in
    if source.d_in != width:
        what = (
            f"the transcoder has d_in + d_out = {width}"
            if sae.transcoder
            else f"the SAE has {width}"
        )
        raise SourceError(f"the activations have d_in={source.d_in} but {what}")
    param = sae.W_dec
    counts = torch.zeros(sae.n_latents, dtype=torch.int64, device=param.device)
    sums: dict[str, float] = {}
    total = torch.zeros(sae.d_out, dtype=torch.float64, device=param.device)
    seen = batches = 0
    while seen < tokens:
        rows = source.next_batch(min(batch_size, tokens - seen)).to(param.device)
        raw, target = sae.split_rows(rows)
        with eval_mode(sae):
            out = sae(raw.to(param.dtype))
        counts += firing_counts(out.code, sae.n_latents)
        # Errors against the activations as the source gives them, not as rounded to the
        # SAE's dtype: a bf16 SAE is charged for the rounding of its input too.
        x64 = target.double()
        for key, value in _token_sums(x64, out.x_hat.double(), out.code).items():
            sums[key] = sums.get(key, 0.0) + value
        total += x64.sum(dim=0)
        seen += raw.shape[0]
        batches += 1
        if progress is not None:
            progress.update(raw.shape[0])
    variance = sums["sq_norm"] - total.pow(2).sum().item() / seen
    # SAEBench's explained_variance (the module docstring), from its batch means.
    mean_sq = sums["batch_sq_norm"] / batches
    saebench_total = mean_sq - (mean_sq / sae.d_out) ** 2
    freq = counts.double() / seen
    metrics = {
        "tokens": seen,
        "mse": sums["sq_err"] / (seen * sae.d_out),
        "fvu": _ratio(sums["sq_err"], variance),
        "explained_variance": 1 - _ratio(sums["batch_sq_err"] / batches, saebench_total),
        "explained_variance_legacy": _ratio(sums["explained"], sums["explained_tokens"]),
        "cossim": sums["cossim"] / seen,
        "l2_norm_in": sums["norm_in"] / seen,
        "l2_norm_out": sums["norm_out"] / seen,
        "l2_ratio": sums["ratio"] / seen,
        "relative_reconstruction_bias": _ratio(sums["sq_norm_out"], sums["dot"]),
        "l0": sums["active"] / seen,
        "l1": sums["l1"] / seen,
        "frac_alive": (counts > 0).double().mean().item(),
        "dead_fraction": (counts == 0).double().mean().item(),
        "dense_fraction": (freq > dense_threshold).double().mean().item(),
    }
    return metrics, freq.cpu()


def _ratio(num: float, den: float) -> float:
    """num / den, NaN where den is 0 (an SAE that outputs nothing, one row, no variance)."""
    return num / den if den != 0 else float("nan")


def _token_sums(x: Tensor, x_hat: Tensor, code) -> dict[str, float]:
    """The per-token quantities of one batch, summed.  x, x_hat: (n, d) float64."""
    err = (x - x_hat).pow(2).sum(dim=-1)
    spread = (x - x.mean(dim=0)).pow(2).sum(dim=-1)
    # A token at its batch's mean (a batch of one row, of identical rows) has no variance to
    # explain: left out, to the rounding of the batch's scale.
    at_mean = spread <= 1e-12 * x.pow(2).sum(dim=-1).mean()
    norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
    values = code.values if isinstance(code, SparseCode) else code
    return {
        "sq_err": err.sum().item(),
        "sq_norm": x.pow(2).sum().item(),
        "batch_sq_err": err.mean().item(),
        "batch_sq_norm": x.pow(2).sum(dim=-1).mean().item(),
        "explained": (1 - err / spread)[~at_mean].sum().item(),
        "explained_tokens": float((~at_mean).sum()),
        "cossim": nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum().item(),
        "norm_in": norm_in.sum().item(),
        "norm_out": norm_out.sum().item(),
        "ratio": (norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum().item(),
        "sq_norm_out": norm_out.pow(2).sum().item(),
        "dot": (x * x_hat).sum().item(),
        "active": active_latents(code).sum().item(),
        "l1": values.detach().double().sum().item(),
    }


def density_histogram(freq: Tensor, low: int = -8) -> dict:
    """Latents by log10 firing frequency: counts in the unit bins [low, low + 1), ...,
    [-1, 0], and the dead latents (never fired) apart.  freq: (m,) in [0, 1]."""
    alive = freq[freq > 0].double().log10().clamp(min=low, max=-1e-12)
    counts = torch.histc(alive, bins=-low, min=low, max=0) if alive.numel() else None
    return {
        "log10_edges": list(range(low, 1)),
        "counts": [0] * -low if counts is None else [int(c) for c in counts.tolist()],
        "dead": int((freq == 0).sum()),
    }


def _next_token_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) over the unpadded positions.
    logits: (b, t, vocab); ids, mask: (b, t)."""
    logits = logits[:, :-1]
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
    hook_in: str | None = None,
) -> dict[str, float]:
    """Next-token loss of a causal LM clean, with the SAE's reconstruction spliced in at hook,
    and with the hook's output zeroed; ce_recovered = (zero - sae) / (zero - clean); and the
    KL divergence of the spliced and zeroed next-token distributions from the clean one
    (the module docstring has the definitions). A transcoder reads hook_in and its
    prediction replaces hook's output.
    """
    check_causal_lm(model)
    variants = {
        "clean": nullcontext,
        # The reconstruction replaces the output.
        "sae": lambda: attach(model, hook, sae, hook_in=hook_in),
        "zero_ablated": lambda: splice(model, hook, torch.zeros_like),
    }
    sums = dict.fromkeys(variants, 0.0)
    kl = dict.fromkeys(("sae", "zero_ablated"), 0.0)
    count = positions = 0
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
        clean = None
        for name, context in variants.items():  # clean first: the others' KL is from it
            with context():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss, n = _next_token_loss(logits, ids, mask)
            sums[name] += loss
            log_p = logits.log_softmax(dim=-1)
            del logits  # (b, t, vocab) each: hold as few as the KL needs
            if clean is None:
                clean, clean_p = log_p, log_p.exp()
            else:
                kl_t = (clean_p * (clean - log_p)).sum(dim=-1)
                kl[name] += kl_t[mask.bool()].sum().item()
        count += n
        positions += int(mask.sum())
    if count == 0:
        raise SourceError(f"text source {documents_spec!r} gave no tokens to predict")
    result = {f"ce_loss_{name}": total / count for name, total in sums.items()}
    gap = result["ce_loss_zero_ablated"] - result["ce_loss_clean"]
    result["ce_recovered"] = (result["ce_loss_zero_ablated"] - result["ce_loss_sae"]) / gap
    result["ce_loss_score"] = result["ce_recovered"]
    result["ce_tokens"] = count
    result["kl_div_with_sae"] = kl["sae"] / positions
    result["kl_div_with_ablation"] = kl["zero_ablated"] / positions
    result["kl_div_score"] = 1 - _ratio(kl["sae"], kl["zero_ablated"])
    return result
