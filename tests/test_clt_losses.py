"""A cross-layer transcoder's training loss against a dense float64 reference written from
its definition: reconstruction summed over target layers, AuxK on dead features decoded to
every target, the tanh and L1 penalties from the sparse code."""

from __future__ import annotations

import pytest
import torch
from test_clt import L, M, dense_reference, integer_clt

from sae_fast import reference
from sae_fast.training.clt_losses import CLTLossWeights, clt_training_loss


def dense_loss(clt, x, y, weights, dead_mask):
    """The loss from the definition: dense codes, dense decodes."""
    y_hat = dense_reference(clt, x)
    loss = sum((y[t] - y_hat[t]).pow(2).sum(-1).mean() for t in range(L))
    if clt.activation in ("topk", "batchtopk") and dead_mask is not None and dead_mask.any():
        k_aux = min(weights.k_aux, int(dead_mask.sum(1).max()))
        aux = []
        for i in range(L):
            pre = reference.pre_activation(x[i], clt.W_enc[i], clt.b_enc[i], 0)
            aux.append(
                reference.sparse_to_dense(*reference.masked_topk(pre, dead_mask[i], k_aux), M)
            )
        e_hat = reference.clt_decode(torch.stack(aux), list(clt.W_dec), torch.zeros_like(clt.b_dec))
        residual = (y - y_hat).detach()
        loss = loss + weights.auxk * sum(
            (residual[t] - e_hat[t]).pow(2).sum(-1).mean() for t in range(L)
        )
    if clt.activation in ("relu", "jumprelu"):
        norms = torch.stack([W.pow(2).sum(dim=(1, 2)).sqrt() for W in clt.W_dec])
        codes = []
        for i in range(L):
            pre = reference.pre_activation(x[i], clt.W_enc[i], clt.b_enc[i], 0)
            if clt.activation == "relu":
                codes.append(reference.relu(pre))
            else:
                t = clt.log_threshold[i].exp()
                codes.append(reference.jumprelu(pre, t, clt.jumprelu_bandwidth))
        weighted = torch.stack(codes) * norms[:, None]
        if clt.activation == "jumprelu":
            weighted = torch.tanh(weights.tanh_c * weighted)
        loss = loss + weights.sparsity * weighted.sum(dim=(0, 2)).mean()
    return loss


def grads(clt, loss_fn):
    clt.zero_grad()
    loss = loss_fn()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in clt.named_parameters()}}


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("dead", [False, True])
def test_loss_and_every_gradient_match_the_dense_definition(activation, dead):
    clt, x = integer_clt(activation, skip=True)
    y = torch.randint(-2, 3, (L, x.shape[1], clt.d_out), generator=torch.Generator().manual_seed(9))
    y = y.double()
    weights = CLTLossWeights(auxk=0.5, k_aux=5, sparsity=0.25, tanh_c=0.7)
    dead_mask = torch.rand(L, M, generator=torch.Generator().manual_seed(2)) < 0.4 if dead else None
    ours = grads(clt, lambda: clt_training_loss(clt, x, y, weights, dead_mask).loss)
    oracle = grads(clt, lambda: dense_loss(clt, x, y, weights, dead_mask))
    for name, want in oracle.items():
        torch.testing.assert_close(ours[name], want, rtol=0, atol=1e-10, msg=name)
    res = clt_training_loss(clt, x, y, weights, dead_mask)
    expected = {"recon"} | ({"auxk"} if dead and activation in ("topk", "batchtopk") else set())
    expected |= {"sparsity"} if activation in ("relu", "jumprelu") else set()
    assert set(res.terms) == expected
