"""The SAE config without the module: what formats check against is what the module holds."""

from __future__ import annotations

import pytest
import torch

from sae_fast import ACTIVATIONS, SparseAutoencoder, sae_config


def _sae(activation: str) -> SparseAutoencoder:
    k = 3 if activation in sae_config.SPARSE_ACTIVATIONS else None
    return SparseAutoencoder(5, 12, k=k, activation=activation, dtype=torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_tensor_shapes_are_the_modules_state_dict(activation):
    sae = _sae(activation)
    shapes = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    assert sae_config.tensor_shapes(sae.config()) == shapes
    assert tuple(sae.config()) == sae_config.FIELDS
    assert set(sae_config.FIELDS) == {*sae_config.REQUIRED, *sae_config.DEFAULTS}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_from_config_rebuilds_the_module_on_its_tensors(activation):
    sae = _sae(activation)
    tensors = {name: t.clone() for name, t in sae.state_dict().items()}
    back = SparseAutoencoder.from_config(sae.config(), tensors)
    assert back.config() == sae.config()
    assert all(torch.equal(back.state_dict()[n], t) for n, t in tensors.items())
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(back.eval()(x).x_hat, sae.eval()(x).x_hat, rtol=0, atol=0)


def test_complete_fills_defaults_and_names_what_is_wrong():
    full = sae_config.complete({"d_in": 4, "n_latents": 8, "dtype": "float32", "k": 2})
    assert full == {**sae_config.DEFAULTS, "d_in": 4, "n_latents": 8, "dtype": "float32", "k": 2}
    assert sae_config.dtype(full) is torch.float32
    with pytest.raises(ValueError, match=r"unknown fields \['width'\]"):
        sae_config.complete({**full, "width": 3})
    with pytest.raises(ValueError, match=r"missing fields \['n_latents'\]"):
        sae_config.complete({"d_in": 4, "dtype": "float32"})
    with pytest.raises(ValueError, match="dtype must name a floating-point torch dtype"):
        sae_config.complete({**full, "dtype": "int8"})
    with pytest.raises(ValueError, match="k is required for activation='topk'"):
        sae_config.complete({**full, "k": None})


def test_provenance_keeps_unknown_keys_and_checks_the_known_ones():
    from sae_fast.sae_config import complete

    base = {"d_in": 4, "n_latents": 8, "k": 2, "dtype": "float32"}
    newer = complete({**base, "provenance": {"model": "gpt2", "dataset_revision": "abc"}})
    assert newer["provenance"] == {"model": "gpt2", "dataset_revision": "abc"}
    for bad, message in [({"train": "x"}, "provenance.train must be dict"),
                         ({"model": 5}, "provenance.model must be str"),
                         ({"step": True}, "provenance.step must be int")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            complete({**base, "provenance": bad})
