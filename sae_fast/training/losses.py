"""Training losses of every activation: reconstruction plus its sparsity and auxiliary terms.

Reconstruction is the squared error summed over d_out (a transcoder's output width, else
d_in) and averaged over tokens. The AuxK term
(Gao et al. 2024) uses the same normalisation, so its coefficient (1/32 there) means what it
means in the paper, where both terms are divided by the same variance.

A Matryoshka SAE (Bussmann et al. 2025) reconstructs from each prefix of its dictionary: the
term is the mean over its prefix sizes p of the squared error of b_dec + the code's latents
below p alone (the sum over prefixes in the paper, divided by their number so that one
prefix is plain reconstruction and AuxK's coefficient keeps its meaning). The prefixes come
from one sparse decode of the (n, k) code (matryoshka_decode), which also gives the whole
reconstruction: no dense (n, m) work, and a step costs about what a plain one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as ref
from ..ops import SparseCode
from ..options import SPARSE_ACTIVATIONS
from ..sae import SAEOutput, SparseAutoencoder, autocast_inputs


@dataclass
class LossWeights:
    """Coefficients of the terms; each applies only to the activations that use it.

    auxk: AuxK (topk, batchtopk) with k_aux latents; l1: decoder-norm-weighted L1 (relu,
    gated); l0: JumpReLU's L0 with its straight-through threshold gradient.
    """

    auxk: float = 1 / 32
    k_aux: int = 256
    l1: float = 5.0
    l0: float = 1.0


@dataclass
class StepOutput:
    """The loss to backpropagate, its detached terms by name, and the forward's output."""

    loss: Tensor
    terms: dict[str, Tensor]
    out: SAEOutput


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """sum over d of (x - x_hat)^2, mean over tokens.  x, x_hat: (n, d) -> scalar."""
    diff = x - x_hat
    if diff.element_size() < 4:  # sum half-precision squares in float32
        diff = diff.float()
    return diff.pow(2).sum(dim=-1).mean()


def matryoshka_decode(sae: SparseAutoencoder, code: SparseCode) -> Tensor:
    """(n, G, d_out): the decode of each of sae.matryoshka's G prefixes of code (n, k), the last
    the whole dictionary's.

    Each (token, latent) pair is summed once, into its token's bag for the group of latents
    [prefixes[g - 1], prefixes[g]) it falls in, and the prefixes are the running sums of the
    groups: one sparse decode of the code, however many prefixes. A latent-sharded SAE sums
    its own latents' pairs into the groups and the shards' group sums add up (sae.own_pairs,
    sae.sum_shards), as its decode does.
    """
    if not isinstance(code, SparseCode):
        raise ValueError("matryoshka_decode needs a TopK code (n, k): the SAE in training mode")
    if sae.input_norm != "none":
        raise ValueError(f"a Matryoshka SAE with input_norm={sae.input_norm!r} is not trained here")
    n, groups = code.indices.shape[0], len(sae.matryoshka)
    values, W_dec, b_dec = autocast_inputs(code.values, sae.W_dec, sae.b_dec)
    values, rows = sae.own_pairs(values, code.indices)
    bounds = torch.tensor(sae.matryoshka[:-1], device=code.indices.device)
    bag = torch.bucketize(code.indices.contiguous(), bounds, right=True)
    bag = (bag + groups * torch.arange(n, device=bag.device)[:, None]).reshape(-1)
    order = torch.argsort(bag, stable=True)
    # Bag sizes by scatter, not bincount, which would wait for the GPU on every step.
    counts = torch.zeros(n * groups, dtype=bag.dtype, device=bag.device)
    counts.scatter_add_(0, bag, torch.ones_like(bag))
    parts = F.embedding_bag(
        rows.reshape(-1)[order],
        W_dec,
        torch.cumsum(counts, 0) - counts,
        mode="sum",
        per_sample_weights=values.reshape(-1)[order].to(W_dec.dtype),
    )
    # Running sums in at least float32: half precision would round at every group.
    wide = torch.promote_types(W_dec.dtype, torch.float32)
    parts = sae.sum_shards(parts.view(n, groups, sae.d_out))
    prefixes = parts.to(wide).cumsum(1) + b_dec.to(wide)
    return prefixes.to(W_dec.dtype)


def auxk_term(x: Tensor, x_hat: Tensor, aux: SparseCode, sae: SparseAutoencoder) -> Tensor:
    """Dead latents' code aux (n, k_aux) decodes (no b_dec) the fixed residual x - x_hat
    (x: the target, (n, d_out))."""
    residual = (x - x_hat).detach()
    e_hat = sae.decode(aux) - sae.b_dec
    return squared_error(residual, e_hat)


def training_loss(
    sae: SparseAutoencoder,
    x: Tensor,
    weights: LossWeights,
    dead_mask: Tensor | None = None,
    sparsity_scale: float = 1.0,
    target: Tensor | None = None,
) -> StepOutput:
    """Loss of sae on x (n, d_in) for its activation, reconstructing target (n, d_out): x
    by default, a transcoder's output activations.

    dead_mask (m,) bool (a sharded SAE's: its own latents') enables AuxK for topk/batchtopk
    when any latent is dead; sparsity_scale multiplies the l1/l0 coefficient (its warmup).
    """
    target = x if target is None else target
    skipped = sae.skip(x)  # the skip connection's part of every reconstruction, or None
    terms: dict[str, Tensor] = {}
    aux = None
    use_auxk = sae.activation in SPARSE_ACTIVATIONS and weights.auxk > 0 and dead_mask is not None
    dead = sae.count_latents(dead_mask) if use_auxk else 0  # over all shards of a sharded SAE
    if dead:
        k_aux = min(weights.k_aux, dead)
        code, aux = sae.encode_with_auxk(x, dead_mask, k_aux)
    elif sae.matryoshka is not None:
        code = sae.encode(x)
    if sae.matryoshka is not None:  # the last prefix's decode is the whole dictionary's
        prefixes = matryoshka_decode(sae, code)
        if skipped is not None:
            prefixes = prefixes + skipped[:, None]
        out = SAEOutput(x_hat=prefixes[:, -1], code=code)
    elif dead:
        out = SAEOutput(x_hat=sae.output(x, code), code=code)
    else:
        out = sae(x)
    recon = squared_error(target, out.x_hat)
    loss = recon
    terms["recon"] = recon
    if sae.matryoshka is not None:
        errors = [squared_error(target, prefixes[:, g]) for g in range(prefixes.shape[1])]
        terms["matryoshka"] = torch.stack(errors).mean()
        loss = terms["matryoshka"]
    if aux is not None:
        terms["auxk"] = auxk_term(target, out.x_hat, aux, sae)
        loss = loss + weights.auxk * terms["auxk"]
    if sae.activation in ("relu", "gated"):
        gate = out.code if sae.activation == "relu" else torch.relu(out.pre)
        terms["l1"] = ref.l1_penalty(gate, sae.W_dec)
        loss = loss + sparsity_scale * weights.l1 * terms["l1"]
    if sae.activation == "gated":
        # The gate path alone must reconstruct x through a frozen decoder (Rajamanoharan et al.).
        x_gate = ref.decode_dense(torch.relu(out.pre), sae.W_dec.detach(), sae.b_dec.detach())
        if skipped is not None:
            x_gate = x_gate + skipped.detach()
        terms["gate_aux"] = squared_error(target, x_gate)
        loss = loss + terms["gate_aux"]
    if sae.activation == "jumprelu":
        threshold = sae.log_threshold.exp()
        terms["l0_penalty"] = ref.jumprelu_l0(out.pre, threshold, sae.jumprelu_bandwidth)
        loss = loss + sparsity_scale * weights.l0 * terms["l0_penalty"]
    return StepOutput(loss=loss, terms={k: v.detach() for k, v in terms.items()}, out=out)
