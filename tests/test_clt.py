"""Cross-layer transcoders: the module against a dense float64 reference written from the
definition (forward and every gradient; ties, all-negative rows, widths that tile nothing),
no dense (n, m) tensor on the sparse path, and the checks of its arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sae_fast import reference
from sae_fast.clt import CrossLayerTranscoder, to_jumprelu
from sae_fast.options import CLT_ACTIVATIONS as ACTIVATIONS

L, D_IN, D_OUT, M, K, N = 3, 7, 5, 37, 4, 13  # widths that tile nothing


def integer_clt(activation: str, skip: bool = False, d_out: int = D_OUT, seed: int = 0):
    """A float64 CLT with small-integer weights (exact sums, many ties) and an input whose
    row 0 is all-negative at every layer and row 1 has fewer than K positives."""
    g = torch.Generator().manual_seed(seed)
    k = K if activation in ("topk", "batchtopk") else None
    clt = CrossLayerTranscoder(
        L, D_IN, M, k=k, activation=activation, d_out=d_out, skip_connection=skip,
        dtype=torch.float64, jumprelu_bandwidth=2.5,
    )  # fmt: skip
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g))
        clt.b_enc.copy_(torch.randint(-3, 1, clt.b_enc.shape, generator=g))
        if activation == "jumprelu":
            thresholds = torch.tensor([0.5, 1.0, 1.5]).repeat(M)[: L * M].reshape(L, M)
            clt.log_threshold.copy_(thresholds.log())
    x = torch.randint(-2, 3, (L, N, D_IN), generator=g).double()
    x[:, 0] = 0  # pre = b_enc <= 0: no feature fires
    x[:, 1] = 0
    x[:, 1, 0] = 1  # pre = b_enc + W_enc[:, :, 0]: positive for few features
    return clt.train(), x


def dense_reference(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """y (L, n, d_out) from the definition: each layer's dense code, every decoder."""
    codes = []
    for i in range(clt.n_layers):
        pre = reference.pre_activation(x[i], clt.W_enc[i], clt.b_enc[i], 0)
        if clt.activation == "topk":
            z = reference.sparse_to_dense(*reference.topk(pre, clt.k), clt.n_latents)
        elif clt.activation == "batchtopk" and clt.training:
            z = reference.batchtopk(pre, clt.k)
        elif clt.activation == "batchtopk":
            z = reference.threshold_relu(pre, clt.threshold[i])
        elif clt.activation == "relu":
            z = reference.relu(pre)
        else:
            threshold = clt.log_threshold[i].exp()
            z = reference.jumprelu(pre, threshold, clt.jumprelu_bandwidth)
        codes.append(z)
    y = reference.clt_decode(torch.stack(codes), list(clt.W_dec), clt.b_dec)
    if clt.skip_connection:
        y = y + torch.stack([x[i] @ clt.W_skip[i].T for i in range(clt.n_layers)])
    return y


def outputs_and_grads(clt: CrossLayerTranscoder, x: torch.Tensor, forward) -> dict:
    x = x.detach().clone().requires_grad_(True)
    clt.zero_grad()
    y = forward(clt, x)
    g = torch.Generator().manual_seed(5)
    (y * torch.randint(-2, 3, y.shape, generator=g)).sum().backward()
    out = {"y": y.detach(), "grad_x": x.grad}
    out.update({f"grad_{n}": p.grad.clone() for n, p in clt.named_parameters()})
    return out


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("skip", [False, True])
def test_forward_and_every_gradient_match_the_dense_reference(activation, skip):
    clt, x = integer_clt(activation, skip)
    ours = outputs_and_grads(clt, x, lambda c, x: c(x).y_hat)
    oracle = outputs_and_grads(clt, x, dense_reference)
    assert ours.keys() == oracle.keys()
    for name, want in oracle.items():
        assert want is not None, name
        torch.testing.assert_close(ours[name], want, rtol=0, atol=1e-12, msg=name)
    assert ours["y"].abs().sum() > 0
    if activation == "jumprelu":  # the threshold's straight-through gradient was exercised
        assert ours["grad_log_threshold"].abs().sum() > 0


def test_calibrated_batchtopk_uses_each_layers_threshold():
    clt, x = integer_clt("batchtopk")
    clt.eval()
    with torch.no_grad():
        clt.threshold.copy_(torch.tensor([0.5, 1.5, 2.5]))
    out = clt(x)
    assert out.pre is not None
    torch.testing.assert_close(out.y_hat, dense_reference(clt, x), rtol=0, atol=1e-12)


def test_code_is_sparse_and_decodes_to_the_output():
    clt, x = integer_clt("topk")
    out = clt(x)
    assert out.code.values.shape == (L, N, K) and out.pre is None
    assert torch.equal(clt.decode(out.code), out.y_hat)
    dense = out.code.to_dense(M)  # (L, n, m): what the reference decodes
    torch.testing.assert_close(
        out.y_hat, reference.clt_decode(dense, list(clt.W_dec), clt.b_dec), rtol=0, atol=1e-12
    )
    assert (out.code.values[:, 0] == 0).all()  # the all-negative row fires nothing


def test_leading_dimensions_are_kept():
    clt, x = integer_clt("topk")
    batch = x.reshape(L, 1, N, D_IN).expand(L, 2, N, D_IN)
    out = clt(batch)
    assert out.y_hat.shape == (L, 2, N, D_OUT) and out.code.values.shape == (L, 2, N, K)
    torch.testing.assert_close(out.y_hat[:, 1], clt(x).y_hat, rtol=0, atol=1e-12)


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_path_never_makes_a_dense_tokens_by_features_tensor(activation):
    n, m, width = 96, 640, 300  # torch's chunked encoder reads chunks of latents
    clt = CrossLayerTranscoder(L, 16, m, k=8, activation=activation, chunk_size=128).train()
    x = torch.randn(L, n, 16, requires_grad=True)
    with Shapes() as seen:
        clt(x).y_hat.square().sum().backward()
    big = [(op, s) for op, s in seen.shapes if torch.Size(s).numel() >= n * width]
    assert not [(op, s) for op, s in big if n in s and (m in s or L * m in s)], big
    assert seen.shapes  # the mode saw the ops


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "gated"}, "activation must be one of"),
        ({"activation": "topk", "k": None}, "k is required"),
        ({"activation": "relu", "k": 3}, "k is only used"),
        ({"n_layers": 0}, "n_layers"),
        ({"k": 0}, "k"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, message):
    options = {"n_layers": L, "d_in": D_IN, "n_latents": M, "k": K, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        CrossLayerTranscoder(**options)


def test_input_must_stack_every_layer():
    clt, x = integer_clt("topk")
    with pytest.raises(ValueError, match=r"x must be \(n_layers=3"):
        clt(x[:2])
    with pytest.raises(ValueError, match="x"):
        clt(x[..., :3])
    with pytest.raises(ValueError, match=r"code must be \(n_layers=3"):
        clt.decode(clt.encode(x)._replace(values=torch.zeros(2, N, K, dtype=torch.float64)))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("method", ["frequency", "crosslayer-coding"])
def test_to_jumprelu_calibrates_thresholds_to_the_topk_rule(tmp_path, activation, method):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(L, 16, 64, k=4, activation=activation)
    with torch.no_grad():
        clt.b_enc.uniform_(-0.3, 0.1)
    held_out = [torch.randn(L, 256, 16) for _ in range(4)]
    jump = to_jumprelu(clt, iter(held_out), method=method)  # any iterable, read twice
    assert jump.activation == "jumprelu" and jump.k is None
    assert torch.isfinite(jump.log_threshold).all()
    for name in ("W_enc", "b_enc", "b_dec", "W_dec.0", "W_dec.2"):
        assert torch.equal(jump.state_dict()[name], clt.state_dict()[name]), name
    x = torch.randn(L, 512, 16)
    l0 = (jump.eval()(x).code.values > 0).sum(-1).double().mean(-1)
    assert ((l0 > 3) & (l0 < 5)).all(), l0  # the per-layer L0 matched to k = 4
    raw = to_jumprelu(clt, held_out, method=method, match_l0=False)
    if method == "crosslayer-coding":
        assert not torch.equal(raw.log_threshold, jump.log_threshold)
    jump.save(tmp_path / "ct", format="circuit-tracer")  # the layout that needs it
    with pytest.raises(ValueError, match="topk or batchtopk"):
        to_jumprelu(jump, held_out)


def test_frequency_calibration_fires_each_feature_as_often_as_topk_selects_it():
    torch.manual_seed(1)
    clt = CrossLayerTranscoder(L, 16, 64, k=4).train()
    held_out = [torch.randn(L, 300, 16, dtype=torch.float32) for _ in range(3)]
    jump = to_jumprelu(clt, held_out, match_l0=False).eval()
    x = torch.cat(held_out, dim=1)
    selected = (clt.encode(x).to_dense(64) > 0).sum(dim=1)  # (L, m) over all tokens
    fired = (jump.encode(x).to_dense(64) > 0).sum(dim=1)
    assert torch.equal(fired, selected)
    with pytest.raises(ValueError, match="method must be one of"):
        to_jumprelu(clt, held_out, method="quantile")
    with pytest.raises(ValueError, match="at least one batch"):
        to_jumprelu(clt, [])


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_fold_scales_makes_the_scaled_clt_compute_raw_outputs(activation):
    clt, x = integer_clt(activation, skip=True)
    clt.eval()
    a = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    c = torch.tensor([0.25, 1.0, 8.0], dtype=torch.float64)
    trained = clt(x * a[:, None, None]).y_hat / c[:, None, None]  # y from the scaled CLT
    clt.fold_scales_(a, c)
    torch.testing.assert_close(clt(x).y_hat, trained, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="input_scale must hold n_layers=3"):
        clt.fold_scales_(torch.ones(2), c)
    with pytest.raises(ValueError, match="output_scale"):
        clt.fold_scales_(a, torch.tensor([1.0, 0.0, 1.0]))


def test_the_minilm_example_trains_calibrates_evaluates_and_saves(tmp_path):
    """examples/clt_minilm.py, the README's CLT example, at a tiny size (MiniLM is packaged)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "clt_minilm.py"
    spec = importlib.util.spec_from_file_location("clt_minilm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--tokens", "600", "--held-out", "300", "--steps", "3", "--n-latents", "64", "--k", "4"]
    result = example.main([*args, "--out", str(tmp_path)])
    for name in ("topk", "jumprelu"):
        assert len(result[name]["fvu"]) == 6 and all(v > 0 for v in result[name]["fvu"])
    assert result["topk"]["l0"] == [4.0] * 6
    assert CrossLayerTranscoder.load(tmp_path / "clt").activation == "topk"
    assert CrossLayerTranscoder.load(tmp_path / "clt_circuit_tracer").activation == "jumprelu"
