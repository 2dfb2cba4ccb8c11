"""SparseAutoencoder: every activation against the reference, shapes, init, constraints."""

from __future__ import annotations

import pytest
import torch
from cases import integer_case

from sae_fast import ACTIVATIONS, SparseAutoencoder, SparseCode
from sae_fast import reference as ref


def make(activation: str, d: int = 6, m: int = 40, k: int | None = 4, **kw) -> SparseAutoencoder:
    torch.manual_seed(0)
    k = k if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(d, m, k=k, activation=activation, dtype=torch.float64, **kw)
    with torch.no_grad():  # non-zero biases so every term of the math is exercised
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def reference_forward(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Dense latents (n, m) that the reference computes for this module's activation."""
    pre = ref.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec)
    if sae.activation == "topk":
        values, indices = ref.topk(pre, sae.k)
        return ref.sparse_to_dense(values, indices, sae.n_latents)
    if sae.activation == "batchtopk":
        return ref.batchtopk(pre, sae.k)
    if sae.activation == "relu":
        return ref.relu(pre)
    if sae.activation == "jumprelu":
        return ref.jumprelu(pre, sae.log_threshold.exp(), sae.jumprelu_bandwidth)
    return ref.gated_encode(x, sae.W_enc, sae.b_enc, sae.r_mag, sae.b_mag, sae.b_dec)[0]


def dense(code, m: int) -> torch.Tensor:
    return code.to_dense(m) if isinstance(code, SparseCode) else code


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_and_grads_match_reference_with_leading_dims(activation):
    sae = make(activation)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    out = sae(x)
    assert out.x_hat.shape == (2, 3, 6)
    z = dense(out.code, sae.n_latents)
    assert z.shape == (2, 3, sae.n_latents)
    z_ref = reference_forward(sae, x.reshape(-1, 6))
    torch.testing.assert_close(z.reshape(-1, sae.n_latents), z_ref)
    x_hat_ref = ref.decode_dense(z_ref, sae.W_dec, sae.b_dec).reshape(2, 3, 6)
    torch.testing.assert_close(out.x_hat, x_hat_ref)

    grads = torch.autograd.grad(ref.mse(x, out.x_hat), list(sae.parameters()))
    want = torch.autograd.grad(ref.mse(x, x_hat_ref), list(sae.parameters()), allow_unused=True)
    for (name, _), g, w in zip(sae.named_parameters(), grads, want, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, msg=name)
    if activation in ("relu", "jumprelu", "gated"):
        assert out.pre.shape == (2, 3, sae.n_latents)


def test_topk_code_is_canonical_sparse_code():
    sae = make("topk")
    code = sae.encode(torch.randn(5, 6, dtype=torch.float64))
    assert isinstance(code, SparseCode)
    assert code.values.shape == (5, 4) and code.indices.dtype == torch.int64
    assert (code.values[:, :-1] >= code.values[:, 1:]).all()


def test_batchtopk_row_taking_many_winners_widens_candidates():
    """One row with a huge norm wins almost all n*k slots: far more than 2k of them."""
    sae = make("batchtopk", d=6, m=64, k=2)
    torch.manual_seed(1)
    x = torch.randn(8, 6, dtype=torch.float64) * 0.01
    x[3] = 50 * sae.W_enc[:20].sum(dim=0)
    sae.train()
    code = sae.encode(x)
    z_ref = ref.batchtopk(ref.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec), 2)
    assert (z_ref[3] > 0).sum() > 4  # the case really needs more than 2k from one row
    torch.testing.assert_close(code.to_dense(64), z_ref)


def test_batchtopk_exact_on_integer_ties():
    case = integer_case(13, 5, 17, seed=4)
    sae = SparseAutoencoder(5, 17, k=3, activation="batchtopk", dtype=torch.float64)
    sae.load_state_dict(
        {
            "W_enc": case.W_enc,
            "b_enc": case.b_enc,
            "W_dec": case.W_dec,
            "b_dec": case.b_dec,
            "threshold": torch.tensor(-1.0),
        }
    )
    z_ref = ref.batchtopk(ref.pre_activation(case.x, case.W_enc, case.b_enc, case.b_dec), 3)
    assert torch.equal(sae.encode(case.x).to_dense(17), z_ref)


def test_batchtopk_inference_uses_calibrated_threshold():
    sae = make("batchtopk")
    x = torch.randn(5, 6, dtype=torch.float64)
    sae.eval()
    assert isinstance(sae.encode(x), SparseCode)  # uncalibrated: still the batch rule
    sae.threshold.fill_(0.05)
    pre = ref.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec)
    torch.testing.assert_close(sae.encode(x), ref.threshold_relu(pre, 0.05))


def test_initialisation_follows_gao():
    sae = SparseAutoencoder(16, 128, k=8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.W_enc.dtype == torch.float32


def test_normalize_decoder():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.n_latents, 1, dtype=torch.float64) * 3)
        sae.W_dec[0] = 0
    sae.normalize_decoder_()
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms[1:], torch.ones_like(norms[1:]))
    assert norms[0] == 0


def test_remove_parallel_decoder_grad():
    sae = make("topk")
    x = torch.randn(9, 6, dtype=torch.float64)
    sae.remove_parallel_decoder_grad_()  # no gradient yet: nothing to do
    ref.mse(x, sae(x).x_hat).backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad_()
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(
        (sae.W_dec.grad * unit).sum(dim=1), torch.zeros(sae.n_latents, dtype=torch.float64)
    )
    # Only the parallel part went: what is left plus it gives the original gradient back.
    parallel = (before * unit).sum(dim=1, keepdim=True) * unit
    torch.testing.assert_close(sae.W_dec.grad + parallel, before)
    assert sae.W_dec.grad.abs().sum() > 0


def test_b_dec_from_data():
    sae = SparseAutoencoder(2, 8, k=2, dtype=torch.float64)
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0]], dtype=torch.float64)
    sae.set_b_dec_from_data(x, method="mean")
    torch.testing.assert_close(sae.b_dec, x.mean(dim=0))
    sae.set_b_dec_from_data(x)  # geometric median: an outlier barely moves it
    assert sae.b_dec.norm() < 0.2
    # Optimality: the gradient of the sum of distances vanishes at the median.
    diff = sae.b_dec - x
    assert (diff / diff.norm(dim=1, keepdim=True)).sum(dim=0).norm() < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "softmax", "k": 2}, "activation must be one of"),
        ({"activation": "topk"}, "k is required"),
        ({"activation": "topk", "k": 0}, "k must satisfy 1 <= k <= n_latents=8"),
        ({"activation": "topk", "k": 9}, "k must satisfy"),
        ({"activation": "relu", "k": 2}, "k is only used by"),
        ({"activation": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SparseAutoencoder(4, 8, **kwargs)


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_latents must be a positive int"):
        SparseAutoencoder(4, 0, k=1)
    with pytest.raises(ValueError, match="d_in must be a positive int"):
        SparseAutoencoder(2.5, 8, k=1)


def test_input_errors_name_the_argument():
    sae = SparseAutoencoder(4, 8, k=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in=4\)"):
        sae(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        sae(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype mismatch: x has torch.float64"):
        sae(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sae([[0.0] * 4])


@pytest.mark.parametrize("input_norm", ["layer_norm", "constant_norm"])
def test_input_norm_wraps_the_sae_in_its_normalisation(input_norm):
    sae = make("relu", input_norm=input_norm)
    x = 3.0 * torch.randn(5, 6, dtype=torch.float64) + 1.0
    if input_norm == "layer_norm":  # openai/sparse_autoencoder and SAELens: eps in, not out
        shift = x.mean(dim=-1, keepdim=True)
        scale = (x - shift).std(dim=-1, keepdim=True)
        x_n = (x - shift) / (scale + 1e-5)
    else:  # SAELens constant_norm_rescale: x * sqrt(d) / ||x||
        shift, scale = 0.0, x.norm(dim=-1, keepdim=True) / 6**0.5
        x_n = x / scale
    z = reference_forward(sae, x_n)
    torch.testing.assert_close(sae.encode(x), z)
    want = ref.decode_dense(z, sae.W_dec, sae.b_dec) * scale + shift
    torch.testing.assert_close(sae(x).x_hat, want)
    assert sae.config()["input_norm"] == input_norm
    with pytest.raises(ValueError, match="input_norm must be one of"):
        make("relu", input_norm="rms")
