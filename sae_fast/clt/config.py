"""A cross-layer transcoder's config without the module: its fields, checks and tensors.

The config is the JSON-able dict that rebuilds a CrossLayerTranscoder (its cfg.json):
n_layers (L), d_in (what each layer's encoder reads), d_out (what each layer's output is;
None: d_in), n_latents (features per layer, m), k and activation (topk, batchtopk: k per
token and layer; relu, jumprelu: no k), dtype, jumprelu_bandwidth, skip_connection, and
provenance (what it was trained on: model, the hook points read and written, tokens).
Formats read and write (config, tensors) with these helpers and never import the module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..options import CLT_ACTIVATIONS
from ..sae_config import check_activation, filled
from ..validation import check_int, parse_dtype

FIELDS = (
    "n_layers",
    "d_in",
    "d_out",
    "n_latents",
    "k",
    "activation",
    "dtype",
    "jumprelu_bandwidth",
    "skip_connection",
    "provenance",
)
REQUIRED = ("n_layers", "d_in", "n_latents", "dtype")
DEFAULTS: dict[str, Any] = {
    "d_out": None,
    "k": None,
    "activation": "topk",
    "jumprelu_bandwidth": 1e-3,
    "skip_connection": False,
    "provenance": {},
}


def check_hyperparameters(
    n_layers: object,
    d_in: object,
    n_latents: object,
    k: object,
    activation: object,
    d_out: object = None,
    jumprelu_bandwidth: object = 1e-3,
    skip_connection: object = False,
) -> None:
    """Raise ValueError (TypeError for a k that is not an int) naming the first bad field."""
    check_int(n_layers, "n_layers")
    check_int(d_in, "d_in")
    if d_out is not None:
        check_int(d_out, "d_out")
    check_int(n_latents, "n_latents")
    if not isinstance(skip_connection, bool):
        raise ValueError(f"skip_connection must be true or false, got {skip_connection!r}")
    check_activation(activation, k, n_latents, CLT_ACTIVATIONS)
    if not isinstance(jumprelu_bandwidth, int | float) or not jumprelu_bandwidth > 0:
        raise ValueError(f"jumprelu_bandwidth must be > 0, got {jumprelu_bandwidth!r}")


def complete(config: Mapping[str, Any]) -> dict[str, Any]:
    """config with its defaults filled in, checked: ValueError/TypeError naming what is wrong."""
    full = filled(config, FIELDS, REQUIRED, DEFAULTS)
    full["provenance"] = dict(full["provenance"])
    check_hyperparameters(
        **{name: full[name] for name in FIELDS if name not in ("dtype", "provenance")}
    )
    return full


def output_width(config: Mapping[str, Any]) -> int:
    """The width of each layer's output: d_out where given, else d_in."""
    return config.get("d_out") or config["d_in"]


def dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The parameter dtype a checked config names."""
    return parse_dtype(config["dtype"])


def decoder_norms(W_dec: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L, m): each feature's decoder norm over every target it writes to, from the decoders
    W_dec[i] (m, L - i, d_out) (differentiable)."""
    return torch.stack([W.pow(2).sum(dim=(1, 2)).sqrt() for W in W_dec])


def recorded_hook(provenance: Mapping[str, Any], key: str, layer: int) -> str | None:
    """The hook point of layer (0..L-1) that a CLT's provenance records under key (hooks_in:
    what its features read, hooks_out: what its layer outputs predict), or None."""
    hooks = provenance.get(key)
    return hooks[layer] if isinstance(hooks, list) and 0 <= layer < len(hooks) else None


def feature_dim(name: str) -> int | None:
    """The dim of the state dict's tensor name that runs over features (a latent shard holds
    a block of it): W_enc, b_enc, log_threshold 1, W_dec.i 0; None for b_dec, W_skip and
    batchtopk's threshold, which every shard holds whole."""
    if name.startswith("W_dec."):
        return 0
    return 1 if name in ("W_enc", "b_enc", "log_threshold") else None


def tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors a CLT of this (checked) config holds, by name, with their shapes.

    W_enc (L, m, d_in), b_enc (L, m), b_dec (L, d_out); W_dec.i (m, L - i, d_out) for each
    source layer i: row j, column t holds feature j of layer i's write to layer i + t (the
    layout circuit-tracer stores); a skip connection adds W_skip (L, d_out, d_in); jumprelu
    log_threshold (L, m); batchtopk threshold (L,), negative until calibrated.
    """
    L, m, d = config["n_layers"], config["n_latents"], config["d_in"]
    d_out = output_width(config)
    shapes = {"W_enc": (L, m, d), "b_enc": (L, m), "b_dec": (L, d_out)}
    shapes.update({f"W_dec.{i}": (m, L - i, d_out) for i in range(L)})
    if config.get("skip_connection"):
        shapes["W_skip"] = (L, d_out, d)
    if config["activation"] == "jumprelu":
        shapes["log_threshold"] = (L, m)
    if config["activation"] == "batchtopk":
        shapes["threshold"] = (L,)
    return shapes
