"""openai/sparse_autoencoder state dicts (.pt) against the library's own forward.

The oracle is Autoencoder.forward from openai/sparse_autoencoder (sparse_autoencoder/model.py)
written out in float64 on the raw state-dict tensors: LN (TopK only, as from_state_dict
decides), encoder(x - pre_bias) + latent_bias, TopK = torch.topk then ReLU on the kept values,
decoder(z) + pre_bias, then * std + mu. The library itself is not installed.
"""

from __future__ import annotations

import pytest
import torch
from foreign_checks import assert_same_function, write_code_executing_pickle
from torch import Tensor

from sae_fast import CheckpointError, SparseAutoencoder, formats

D, M, K, N = 9, 32, 6, 20
F64 = torch.float64


def their_forward(sd: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """(recons, latents) of Autoencoder.from_state_dict(sd) on x, in float64."""
    activation = sd.get("activation", "ReLU")
    normalize = activation == "TopK"
    if normalize:  # their LN
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = (x - sd["pre_bias"].double()) @ sd["encoder.weight"].double().T
    pre = pre + sd["latent_bias"].double()
    if activation == "TopK":
        top = torch.topk(pre, k=sd["activation_state_dict"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        z = torch.relu(pre)
    recons = z @ sd["decoder.weight"].double().T + sd["pre_bias"].double()
    if normalize:
        recons = recons * std + mu
    return recons, z


def checkpoint(activation: str | None = "TopK", bias_shift: float = 0.0, seed: int = 0) -> dict:
    """What Autoencoder.state_dict() returns, with random weights (decoder norms not 1).

    activation None: the early ReLU releases, with no activation entries at all.
    bias_shift moves every latent bias, to make rows with fewer than k positive latents.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    dec = randn(D, M)
    dec = dec / dec.norm(dim=0) * torch.empty(M, dtype=F64).uniform_(0.5, 2.0, generator=g)
    sd = {
        "pre_bias": randn(D, scale=0.3),
        "latent_bias": randn(M, scale=0.3) + bias_shift,
        "encoder.weight": randn(M, D, scale=D**-0.5),
        "decoder.weight": dec,
        "stats_last_nonzero": torch.randint(0, 100, (M,), generator=g),
        "latents_activation_frequency": torch.rand(M, generator=g),
        "latents_mean_square": torch.rand(M, generator=g),
    }
    if activation == "TopK":
        sd |= {"activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    elif activation == "ReLU":
        sd |= {"activation": "ReLU", "activation_state_dict": {}}
    return sd


def inputs(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=F64) * 3.0 + 1.0  # LN has work to do


@pytest.mark.parametrize(
    ("activation", "bias_shift"), [("TopK", 0.0), ("TopK", -0.8), ("ReLU", 0.0), (None, 0.0)]
)
def test_loads_and_computes_the_library_forward(tmp_path, activation, bias_shift):
    sd = checkpoint(activation, bias_shift)
    path = tmp_path / "v5_32k_layer_8.pt"
    torch.save(sd, path)
    assert formats.detect(path) == "openai"
    sae = SparseAutoencoder.load(path)
    topk = activation == "TopK"
    assert (sae.activation, sae.k) == (("topk", K) if topk else ("relu", None))
    assert sae.input_norm == ("layer_norm" if topk else "none")
    latents = assert_same_function(sae, lambda x: their_forward(sd, x), inputs())
    active = latents > 0
    assert active.any() and not active.all()
    if bias_shift:  # their top-k of pre keeps non-positive values there; ReLU zeroes them
        assert (active.sum(dim=1) < K).any() and (active.sum(dim=1) == K).any()


def test_float32_checkpoint_and_a_folder_holding_one_file(tmp_path):
    sd = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in checkpoint().items()
    }
    torch.save(sd, tmp_path / "ae_layer3.pt")
    assert formats.detect(tmp_path) == "openai"
    sae = SparseAutoencoder.load(tmp_path)
    assert sae.W_enc.dtype == torch.float32
    assert_same_function(sae, lambda x: their_forward(sd, x), inputs(), 1e-4)
    torch.save(sd, tmp_path / "another.pt")  # two candidates: which one is meant?
    with pytest.raises(CheckpointError, match="not a checkpoint sae_fast reads"):
        formats.detect(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)  # a torch file, but not of this layout
    with pytest.raises(CheckpointError, match="not a checkpoint sae_fast reads"):
        formats.detect(other)


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_save_writes_their_state_dict_and_round_trips(tmp_path, activation):
    sd = checkpoint(activation)
    torch.save(sd, tmp_path / "in.pt")
    sae = SparseAutoencoder.load(tmp_path / "in.pt")
    sae.save(tmp_path / "out.pt", format="openai")
    sae.save(tmp_path / "folder", format="openai")
    x = inputs(seed=2)
    for path, file in ((tmp_path / "out.pt",) * 2, (tmp_path / "folder", "autoencoder.pt")):
        assert formats.detect(path) == "openai"
        saved = torch.load(path / file if path.is_dir() else path, weights_only=True)
        assert set(saved) == set(sd)  # what their from_state_dict(strict=True) wants
        for key in ("activation", "activation_state_dict"):
            assert saved[key] == sd[key]
        for key in ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight"):
            assert torch.equal(saved[key], sd[key]), key
        assert_same_function(sae, lambda x, saved=saved: their_forward(saved, x), x)
        assert_same_function(SparseAutoencoder.load(path), lambda x: their_forward(sd, x), x)


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "sae.pt"
    write_code_executing_pickle(path, marker)
    assert formats.detect(path) == "openai"  # claimed, so that loading says why it fails
    with pytest.raises(CheckpointError, match=r"sae.pt was refused: .*could run code.*GLOBAL"):
        SparseAutoencoder.load(path)
    assert not marker.exists()


def test_bad_files_say_what_is_wrong(tmp_path):
    good = checkpoint()
    topk_params = good["activation_state_dict"]
    cases = {
        "activation 'Identity' is not one sae_fast runs": {**good, "activation": "Identity"},
        "TopK with postact_fn 'Identity'": {
            **good,
            "activation_state_dict": {**topk_params, "postact_fn": "Identity"},
        },
        r"TopK without activation_state_dict\['k'\]": {**good, "activation_state_dict": {}},
        r"k must satisfy 1 <= k <= n_latents=32, got 33": {
            **good,
            "activation_state_dict": {**topk_params, "k": M + 1},
        },
        r"holds \['W_gate'\], which an openai Autoencoder has not": {**good, "W_gate": 1},
        "tied decoder": {
            **{k: v for k, v in good.items() if k != "decoder.weight"},
            "decoder.linear.weight": good["encoder.weight"],
        },
        r"'decoder.weight' has shape \(32, 9\), expected \(9, 32\)": {
            **good,
            "decoder.weight": good["decoder.weight"].T,
        },
        r"'latent_bias' has shape \(31,\), expected \(32,\)": {
            **good,
            "latent_bias": good["latent_bias"][:-1],
        },
        r"missing \['pre_bias'\]": {k: v for k, v in good.items() if k != "pre_bias"},
        "holds a list, not a state dict": [good["pre_bias"]],
    }
    for i, (message, body) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.pt"
        torch.save(body, path)
        with pytest.raises(CheckpointError, match=message):
            SparseAutoencoder.load(path, format="openai")
    truncated = tmp_path / "truncated.pt"
    torch.save(good, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="is not a readable torch file"):
        SparseAutoencoder.load(truncated)


def _sae(activation: str, input_norm: str = "none") -> SparseAutoencoder:
    k = K if activation in ("topk", "batchtopk") else None
    return SparseAutoencoder(D, M, k=k, activation=activation, input_norm=input_norm)


def test_save_refuses_what_their_autoencoder_cannot_run(tmp_path):
    cases = {
        "has no 'jumprelu' activation": _sae("jumprelu"),
        "has no 'batchtopk' activation": _sae("batchtopk"),
        "runs topk with input_norm 'layer_norm' only; this SAE uses 'none'": _sae("topk"),
        "runs relu with input_norm 'none' only": _sae("relu", "layer_norm"),
    }
    for message, sae in cases.items():
        with pytest.raises(CheckpointError, match=message):
            sae.save(tmp_path / "x.pt", format="openai")
    assert not (tmp_path / "x.pt").exists()
    fresh = _sae("topk", "layer_norm")
    fresh.save(tmp_path / "fresh.pt", format="openai")
    sd = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert_same_function(fresh, lambda x: their_forward(sd, x), inputs(), 1e-4)
