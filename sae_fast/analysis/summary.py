"""What `sae-fast inspect` prints: an SAE's architecture, shapes, dtype and weight norms."""

from __future__ import annotations

import torch

from ..sae import SparseAutoencoder


def _stats(values: torch.Tensor) -> dict[str, float]:
    values = values.detach().double()
    return {"min": values.min().item(), "mean": values.mean().item(), "max": values.max().item()}


def summarize(sae: SparseAutoencoder) -> dict:
    """JSON-able description: config, parameter shapes, and norms of rows and biases."""
    info = {
        **sae.config(),
        "parameters": {name: list(p.shape) for name, p in sae.state_dict().items()},
        "decoder_row_norm": _stats(sae.W_dec.norm(dim=1)),
        "encoder_row_norm": _stats(sae.W_enc.norm(dim=1)),
        "b_enc": _stats(sae.b_enc),
        "b_dec_norm": sae.b_dec.detach().double().norm().item(),
    }
    if sae.activation == "jumprelu":
        info["threshold"] = _stats(sae.log_threshold.exp())
    if sae.activation == "batchtopk":
        info["threshold"] = sae.threshold.item()
    return info
