"""A cross-layer transcoder's held-out metrics per target layer, on the activations of the
model and hook points its provenance records (hooks_in: what each layer's features read,
hooks_out: what each layer's output predicts)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..clt.module import CrossLayerTranscoder
from ..ops import SparseCode
from ..sources import SourceError, load_model, stacked_activations
from ..training.metrics import metrics_from_sums, reconstruction_sums


def clt_activations(
    clt: CrossLayerTranscoder, texts: Iterable[str], tokens: int, model: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """(x (L, n, d_in), y (L, n, d_out) or None) of the texts' first tokens (at most that
    many): the CLT's inputs and, where its provenance records hooks_out, its targets, from
    model (default: the recorded one), on the CLT's device. SourceError when the record is
    missing."""
    provenance = clt.provenance
    name = model or provenance.get("model")
    hooks_in, hooks_out = provenance.get("hooks_in"), provenance.get("hooks_out")
    if not name or not isinstance(hooks_in, list) or len(hooks_in) != clt.n_layers:
        raise SourceError(
            "the CLT does not record its model and its n_layers input hook points (provenance "
            "model and hooks_in): give the model, or read activations in Python "
            "(sae_fast.sources.stacked_activations)"
        )
    groups = [hooks_in]
    if isinstance(hooks_out, list) and len(hooks_out) == clt.n_layers:
        groups.append(hooks_out)
    device = clt.W_enc.device
    found = stacked_activations(*load_model(name, device), texts, groups, max_tokens=tokens)
    found = [t.to(clt.W_enc.dtype) for t in found]
    return found[0], found[1] if len(found) > 1 else None


@torch.no_grad()
def clt_metrics(clt: CrossLayerTranscoder, x: Tensor, y: Tensor, batch_size: int = 4096) -> dict:
    """Per target layer over the tokens of x (L, n, d_in) and y (L, n, d_out), batch_size at a
    time: fvu, mse (per element), l0 (source layer t's features active per token) and
    dead_fraction (of layer t's features, the share that fired on none of the tokens)."""
    L, n = y.shape[:2]
    sums = torch.zeros(L, 4 + y.shape[-1], dtype=torch.float64, device=y.device)
    fired = torch.zeros(L, clt.n_latents, dtype=torch.bool, device=y.device)
    for start in range(0, n, batch_size):
        out = clt(x[:, start : start + batch_size])
        yb = y[:, start : start + batch_size].double()
        for layer in range(L):
            code = SparseCode(out.code.values[layer], out.code.indices[layer])
            sums[layer] += reconstruction_sums(yb[layer], out.y_hat[layer].double(), code)
            fired[layer, code.indices[code.values != 0].unique()] = True
    per_layer = [metrics_from_sums(s) for s in sums]
    return {
        "tokens": n,
        **{key: [found[key] for found in per_layer] for key in ("fvu", "mse", "l0")},
        "dead_fraction": (1 - fired.double().mean(dim=1)).tolist(),
    }
