"""A cross-layer transcoder's training loss.

- Reconstruction: the sum over target layers of the squared error (summed over d_out,
  averaged over tokens, as an SAE's: losses.squared_error). That is the sum of the per-layer
  MSE that the circuit-tracing paper (Ameisen et al. 2025) and crosslayer-coding train on,
  scaled by d_out.
- AuxK (topk, batchtopk; Gao et al. 2024): each layer's dead features offer their top k_aux
  pre-activations (CrossLayerTranscoder.encode_with_auxk, from the code's own encoder pass).
  They decode through the whole CLT, to every target of their layer and without b_dec, the
  fixed residual y - y_hat, weighted auxk.
- Sparsity, from the sparse code: JumpReLU's tanh penalty (the circuit-tracing paper's),
  `lambda * sum tanh(c * ||W_dec_f|| * a_f)` over layers and features, averaged over tokens.
  ||W_dec_f|| is the norm of feature f's decoders to all its targets, and the threshold learns
  through JumpReLU's straight-through gradient. ReLU's L1 penalty is
  `lambda * sum ||W_dec_f|| * a_f`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..clt.config import decoder_norms
from ..clt.module import CLTOutput, CrossLayerTranscoder
from ..ops import SparseCode
from ..options import SPARSE_ACTIVATIONS
from .losses import StepOutput, squared_error


@dataclass
class CLTLossWeights:
    """auxk, k_aux: AuxK's coefficient and width (topk, batchtopk); sparsity: the penalty's
    lambda (relu, jumprelu); tanh_c: c in JumpReLU's tanh penalty."""

    auxk: float = 1 / 32
    k_aux: int = 256
    sparsity: float = 1e-3
    tanh_c: float = 4.0


def sparsity_penalty(clt: CrossLayerTranscoder, code: SparseCode, c: float) -> Tensor:
    """Mean over tokens of the summed penalty of code (L, n, width): tanh(c * norm * a)
    (jumprelu) or norm * a (relu), norm the feature's decoder norm."""
    values, indices = code
    L = values.shape[0]
    norms = decoder_norms(clt.W_dec).gather(1, indices.reshape(L, -1)).reshape(indices.shape)
    weighted = norms.to(values.dtype) * values
    if clt.activation == "jumprelu":
        weighted = torch.tanh(c * weighted)
    return weighted.sum(dim=(0, -1)).mean()


def clt_training_loss(
    clt: CrossLayerTranscoder,
    x: Tensor,
    y: Tensor,
    weights: CLTLossWeights,
    dead_mask: Tensor | None = None,
    sparsity_scale: float = 1.0,
) -> StepOutput:
    """The loss of clt predicting y (L, n, d_out) from x (L, n, d_in), for its activation.

    dead_mask (L, m) bool enables AuxK for topk/batchtopk when any feature is dead;
    sparsity_scale multiplies the sparsity coefficient (its warm-up).
    """
    terms: dict[str, Tensor] = {}
    aux = None
    use_auxk = clt.activation in SPARSE_ACTIVATIONS and weights.auxk > 0
    # Per layer, over the whole CLT (every latent shard of a sharded one).
    dead = clt.count_features(dead_mask) if use_auxk and dead_mask is not None else None
    if dead is not None and bool(dead.any()):
        k_aux = min(weights.k_aux, int(dead.max()))
        code, aux = clt.encode_with_auxk(x, dead_mask, k_aux)
        y_hat = clt.decode(code)
        skipped = clt.skip(x)
        out = CLTOutput(y_hat if skipped is None else y_hat + skipped, code)
    else:
        out = clt(x)
    terms["recon"] = sum(squared_error(y[t], out.y_hat[t]) for t in range(clt.n_layers))
    loss = terms["recon"]
    if aux is not None:
        residual = (y - out.y_hat).detach()
        e_hat = clt.decode(aux) - clt.b_dec[:, None]
        terms["auxk"] = sum(squared_error(residual[t], e_hat[t]) for t in range(clt.n_layers))
        loss = loss + weights.auxk * terms["auxk"]
    if clt.activation in ("relu", "jumprelu"):
        terms["sparsity"] = sparsity_penalty(clt, out.code, weights.tanh_c)
        loss = loss + sparsity_scale * weights.sparsity * terms["sparsity"]
    return StepOutput(loss=loss, terms={k: v.detach() for k, v in terms.items()}, out=out)
