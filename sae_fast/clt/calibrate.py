"""A TopK or BatchTopK CLT as a JumpReLU one, with per-feature thresholds calibrated on
held-out activations: the layouts circuit-tracer and llamascopium read have no TopK."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..options import SPARSE_ACTIVATIONS
from .module import CrossLayerTranscoder

_EPS = 1e-6  # guards the division by a feature's spread
_FLOOR = 1e-7  # the smallest threshold (a log threshold must be finite)
_FALLBACK = 1e-5  # a layer's z-score where no feature was ever selected
# The per-layer multipliers of the thresholds tried when matching L0 (crosslayer-coding's range).
_MULTIPLIERS = torch.logspace(-1, 1, 241, dtype=torch.float64)


METHODS = ("frequency", "crosslayer-coding")


@torch.no_grad()
def to_jumprelu(
    clt: CrossLayerTranscoder,
    batches: Sequence[Tensor],
    method: str = "frequency",
    match_l0: bool = True,
) -> CrossLayerTranscoder:
    """A JumpReLU CLT with clt's weights and per-feature thresholds calibrated on batches,
    each (L, n, d_in): every layer's input for n held-out tokens.

    method "frequency": each feature fires on the batches' tokens as often as clt's own rule
    (TopK per token, BatchTopK per batch) selects it. Its threshold lies midway between its
    c-th and (c+1)-th largest pre-activations, c its selection count; a feature never
    selected gets its largest pre-activation (it fires on none of them). This holds each
    layer's (L, tokens, m) pre-activations at once, one layer at a time.

    method "crosslayer-coding" (its post-hoc recipe): on each batch and layer, each
    feature's pre-activations are z-scored over the tokens, and the smallest z-score among
    the tokens the rule selects it for is kept. A layer's z threshold is the mean over its
    features (each averaged over the batches it was selected in); feature j's threshold is
    that z times its mean spread plus its mean. Features never selected get their layer's z.

    Thresholds are at least 1e-7. With match_l0, a last pass scales each layer's thresholds by
    the one multiplier in [0.1, 10] (241 steps, log-spaced) whose L0 on the batches is nearest
    k, as crosslayer-coding's layer-wise L0 calibration does. The passes compute dense (n, m)
    pre-activations: a one-off calibration, not the training path.
    """
    if clt.activation not in SPARSE_ACTIVATIONS:
        raise ValueError(f"clt must be topk or batchtopk to calibrate, not {clt.activation!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    batches = list(batches)  # read more than once: a generator would be empty the second time
    if not batches:
        raise ValueError("batches must hold at least one batch of activations")
    training = clt.training
    clt.train()  # a BatchTopK CLT selects by its training rule
    try:
        selected = [
            clt.encode(x).to_dense(clt.n_latents).reshape(clt.n_layers, -1, clt.n_latents) > 0
            for x in batches
        ]
    finally:
        clt.train(training)
    if method == "frequency":
        threshold = _frequency(clt, batches, selected)
    else:
        threshold = _zscored(clt, batches, selected)
    threshold = threshold.clamp_min(_FLOOR)
    if match_l0:
        threshold = threshold * _l0_multipliers(clt, batches, threshold)[:, None]
    tensors = {name: t.detach().clone() for name, t in clt.state_dict().items()}
    tensors.pop("threshold", None)
    tensors["log_threshold"] = threshold.log().to(clt.W_enc.dtype)
    config = {**clt.config(), "activation": "jumprelu", "k": None}
    out = CrossLayerTranscoder.from_config(config, tensors, backend=clt.backend)
    return out.to(clt.W_enc.device).train(training)


def _frequency(clt: CrossLayerTranscoder, batches: list[Tensor], selected: list[Tensor]) -> Tensor:
    """(L, m): the "frequency" thresholds of to_jumprelu; selected[b]: (L, n, m) bool."""
    thresholds = []
    for layer in range(clt.n_layers):
        pre = torch.cat([_pre(clt, x, layer) for x in batches])  # (tokens, m)
        count = sum(s[layer].sum(dim=0) for s in selected)  # (m,)
        ranked = torch.sort(pre, dim=0, descending=True).values
        above = ranked.gather(0, (count - 1).clamp_min(0)[None])[0]
        below = ranked.gather(0, count.clamp_max(len(pre) - 1)[None])[0]
        midway = torch.where(count < len(pre), (above + below) / 2, torch.zeros_like(above))
        thresholds.append(torch.where(count > 0, midway, ranked[0]))
    return torch.stack(thresholds)


def _zscored(clt: CrossLayerTranscoder, batches: list[Tensor], selected: list[Tensor]) -> Tensor:
    """(L, m): the "crosslayer-coding" thresholds of to_jumprelu."""
    stats = torch.zeros(4, clt.n_layers, clt.n_latents, dtype=torch.float64)
    stats = stats.to(clt.W_enc.device)
    for x, code in zip(batches, selected, strict=True):
        pre = _pre(clt, x)
        mean, spread = pre.mean(dim=1), pre.std(dim=1).nan_to_num(0.0)
        z = (pre - mean[:, None]) / (spread[:, None] + _EPS)
        lowest = z.masked_fill(~code, torch.inf).amin(dim=1)
        seen = code.any(dim=1)
        stats += torch.stack([lowest.where(seen, 0.0), seen.double(), mean, spread])
    n = len(batches)
    lowest, seen, mean, spread = stats[0], stats[1], stats[2] / n, stats[3] / n
    per_feature = (lowest / seen).where(seen > 0, torch.inf)
    usable = torch.isfinite(per_feature) & (per_feature > 0)
    layer_z = (per_feature * usable).nan_to_num(0.0).sum(1) / usable.sum(1).clamp_min(1)
    layer_z = layer_z.where(usable.any(1), torch.full_like(layer_z, _FALLBACK))
    return layer_z[:, None] * spread.clamp_min(_EPS) + mean


def _pre(clt: CrossLayerTranscoder, x: Tensor, layer: int | None = None) -> Tensor:
    """Each layer's dense pre-activations (L, n, m) in float64 of x (L, ..., d_in), or one
    layer's (n, m)."""
    if layer is None:
        return clt.pre_activations(x).double()
    # One layer's alone: the frequency calibration holds a layer's pre-activations of all
    # the batches at once.
    x = x.reshape(clt.n_layers, -1, clt.d_in)
    return torch.addmm(clt.b_enc[layer], x[layer], clt.W_enc[layer].T).double()


def _l0_multipliers(
    clt: CrossLayerTranscoder, batches: Sequence[Tensor], threshold: Tensor
) -> Tensor:
    """(L,): per layer, the multiplier of threshold (L, m) whose L0 on batches is nearest
    clt.k, every candidate counted in one pass (a histogram of pre / threshold)."""
    grid = _MULTIPLIERS.to(threshold.device)
    fires = torch.zeros(clt.n_layers, len(grid) + 1, dtype=torch.float64, device=grid.device)
    tokens = 0
    for x in batches:
        pre = _pre(clt, x)
        tokens += pre.shape[1]
        # A feature fires at multiplier grid[j] where pre / threshold > grid[j], j < bucket.
        buckets = torch.bucketize(pre / threshold[:, None], grid)
        for i in range(clt.n_layers):
            fires[i] += torch.bincount(buckets[i].reshape(-1), minlength=len(grid) + 1)
    if not tokens:
        raise ValueError("batches must hold at least one token")
    l0 = fires.flip(1).cumsum(1).flip(1)[:, 1:] / tokens  # (L, G): L0 at each multiplier
    return grid[(l0 - clt.k).abs().argmin(dim=1)]
