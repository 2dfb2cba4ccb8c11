"""The oracle itself, on hand-worked examples."""

from __future__ import annotations

import torch

from sae_fast import reference as ref


def test_canonical_topk_ties_and_zero_fill():
    pre = torch.tensor([[1.0, 3.0, 3.0, -1.0, 2.0], [-1.0, -2.0, 0.5, -3.0, -4.0]])
    values, indices = ref.topk(pre, 4)
    assert values.tolist() == [[3.0, 3.0, 2.0, 1.0], [0.5, 0.0, 0.0, 0.0]]
    assert indices.tolist() == [[1, 2, 4, 0], [2, 0, 1, 3]]


def test_decode_is_weighted_sum_of_rows():
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b_dec = torch.tensor([0.5, -0.5])
    x_hat = ref.decode(torch.tensor([[2.0, 3.0]]), torch.tensor([[2, 0]]), W_dec, b_dec)
    assert x_hat.tolist() == [[2.0 + 3.0 + 0.5, 2.0 - 0.5]]


def test_batchtopk_keeps_top_n_times_k_over_batch():
    pre = torch.tensor([[5.0, 4.0, 3.0], [1.0, -1.0, 0.5]])
    z = ref.batchtopk(pre, 1)  # keeps 2 entries in all: both from row 0
    assert z.tolist() == [[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
    tied = ref.batchtopk(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 1)
    assert tied.tolist() == [[0.0, 2.0], [2.0, 0.0]]


def test_threshold_relu():
    z = ref.threshold_relu(torch.tensor([[0.1, 0.5, -1.0]]), 0.2)
    assert z.tolist() == [[0.0, 0.5, 0.0]]


def test_jumprelu_forward_and_straight_through_threshold_grad():
    pre = torch.tensor([[0.5, 1.0004, 2.0]], requires_grad=True)
    threshold = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    z = ref.jumprelu(pre, threshold, bandwidth=0.01)
    assert z.tolist() == [[0.0, pre[0, 1].item(), 2.0]]
    z.sum().backward()
    # Only latent 1 sits within bandwidth/2 of its threshold: d/dtheta = -theta / eps.
    assert threshold.grad.tolist() == [0.0, -100.0, 0.0]
    assert pre.grad.tolist() == [[0.0, 1.0, 1.0]]


def test_jumprelu_l0_counts_active_latents_and_trains_only_thresholds():
    pre = torch.tensor([[0.5, 1.0004, 2.0], [1.5, 0.2, 0.9996]], requires_grad=True)
    threshold = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    l0 = ref.jumprelu_l0(pre, threshold, bandwidth=0.01)
    assert l0.item() == 1.5  # rows hold 2 and 1 latents above threshold
    l0.backward()
    # Within bandwidth/2: latent 1 in row 0, latent 2 in row 1; -1/eps each, mean over 2 rows.
    torch.testing.assert_close(threshold.grad, torch.tensor([0.0, -50.0, -50.0]))
    assert pre.grad is None


def test_gated_encoder():
    x = torch.tensor([[1.0, 2.0]])
    W_enc = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    b_gate = torch.tensor([0.0, 0.5])
    r_mag = torch.tensor([0.0, 0.0])
    b_mag = torch.tensor([0.25, 0.0])
    z, pi_gate = ref.gated_encode(x, W_enc, b_gate, r_mag, b_mag, torch.zeros(2))
    assert pi_gate.tolist() == [[1.0, -1.5]]
    assert z.tolist() == [[1.25, 0.0]]  # gate open: relu(1 + 0.25); gate closed: 0
    z2, _ = ref.gated_encode(
        x, W_enc, b_gate, torch.log(torch.tensor([2.0, 2.0])), b_mag, 0 * b_mag
    )
    assert torch.allclose(z2, torch.tensor([[2.25, 0.0]]))


def test_losses():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert ref.mse(x, x).item() == 0.0
    assert ref.mse(x, x + 1).item() == 1.0
    assert ref.fvu(x, x.mean(dim=0).expand_as(x)).item() == 1.0
    assert ref.fvu(x, x).item() == 0.0
    z = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    W_dec = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5 and 2
    assert ref.l1_penalty(z, W_dec, 0.5).item() == 0.5 * ((1 * 5) + (2 * 5 + 3 * 2)) / 2


def test_auxk_loss():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x_hat = torch.zeros(2, 2)
    W_dec = torch.eye(2)
    pre = torch.tensor([[0.5, 3.0], [2.0, -1.0]])
    none_dead = torch.tensor([False, False])
    assert ref.auxk_loss(x, x_hat, pre, W_dec, none_dead, 1).item() == 0.0
    dead = torch.tensor([True, False])  # only latent 0 may reconstruct the residual
    loss = ref.auxk_loss(x, x_hat, pre, W_dec, dead, k_aux=4)
    e_hat = torch.tensor([[0.5, 0.0], [2.0, 0.0]])
    want = (e_hat - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    assert torch.allclose(loss, want)
