"""An SAE's config without the module: its fields, their checks, and the tensors it implies.

The config is the JSON-able dict that rebuilds a SparseAutoencoder (its cfg.json): d_in,
n_latents, k, activation, dtype, jumprelu_bandwidth, input_norm, matryoshka (the nested
prefix sizes of a Matryoshka SAE, or None), transcoder (encodes x without subtracting b_dec
and predicts another activation, of width d_out), skip_connection (x @ W_skip.T added to the
output), and provenance: what the SAE
was trained on (PROVENANCE_KEYS; empty when unknown). Checkpoint formats read and
write (config, tensors) with these helpers and never import the module, which builds itself
from the pair (SparseAutoencoder.from_config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .options import (
    ACTIVATIONS,
    INPUT_NORMS,
    SPARSE_ACTIVATIONS,
    check_matryoshka,
)
from .validation import check_int, check_k, parse_dtype

# Every field in cfg.json's order; those a config must hold, and the defaults of the others.
FIELDS = (
    "d_in",
    "n_latents",
    "k",
    "activation",
    "dtype",
    "jumprelu_bandwidth",
    "input_norm",
    "matryoshka",
    "transcoder",
    "d_out",
    "skip_connection",
    "provenance",
)
REQUIRED = ("d_in", "n_latents", "dtype")
DEFAULTS: dict[str, Any] = {
    "k": None,
    "activation": "topk",
    "jumprelu_bandwidth": 1e-3,
    "input_norm": "none",
    "matryoshka": None,
    "transcoder": False,
    "d_out": None,
    "skip_connection": False,
    "provenance": {},
}
# The fields a plain SAE's cfg.json leaves out at their defaults, so older readers read it.
OPTIONAL = ("matryoshka", "transcoder", "d_out", "skip_connection")
# What provenance says, with the type of each: the model and hook point (as sae_fast names
# them), the text, the activations trained on (tokens) and the steps, the sae_fast version,
# the source's own description and the training options. Other keys (a newer sae_fast's)
# are kept as they are.
PROVENANCE_KEYS = {
    "model": str,
    "hook": str,
    "hook_in": str,
    "hook_out": str,
    "text": str,
    "tokens": int,
    "step": int,
    "sae_fast_version": str,
    "source": dict,
    "train": dict,
    "crosscoder": dict,  # a crosscoder's sources and their widths, in its columns' order
}


def check_hyperparameters(
    d_in: object,
    n_latents: object,
    k: object,
    activation: object,
    input_norm: object,
    jumprelu_bandwidth: object,
    matryoshka: object = None,
    transcoder: object = False,
    d_out: object = None,
    skip_connection: object = False,
) -> None:
    """Raise ValueError (TypeError for a k that is not an int) naming the first bad field."""
    check_int(d_in, "d_in")
    for name, value in (("transcoder", transcoder), ("skip_connection", skip_connection)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if d_out is not None:
        check_int(d_out, "d_out")
        if not transcoder and d_out != d_in:
            raise ValueError(f"d_out={d_out} differs from d_in={d_in}: only a transcoder's may")
    if transcoder and activation == "gated":
        raise ValueError("a gated transcoder is not supported (topk, batchtopk, relu, jumprelu)")
    if (transcoder or skip_connection) and input_norm != "none":
        raise ValueError(f"input_norm={input_norm!r} with a transcoder or skip connection")
    check_int(n_latents, "n_latents")
    check_activation(activation, k, n_latents, ACTIVATIONS)
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if jumprelu_bandwidth <= 0:
        raise ValueError(f"jumprelu_bandwidth must be > 0, got {jumprelu_bandwidth}")
    if matryoshka is not None:
        check_matryoshka(matryoshka, n_latents, activation)


def check_activation(activation: object, k: object, n_latents: int, allowed: Sequence[str]) -> None:
    """ValueError unless activation is one of allowed and k fits it: an int in [1, n_latents]
    for the TopK activations, None for the others (TypeError for a k that is not an int)."""
    if activation not in allowed:
        raise ValueError(f"activation must be one of {tuple(allowed)}, got {activation!r}")
    if activation in SPARSE_ACTIVATIONS:
        if k is None:
            raise ValueError(f"k is required for activation={activation!r}")
        check_k(k, n_latents)
    elif k is not None:
        raise ValueError(f"k is only used by activations {SPARSE_ACTIVATIONS}, not {activation!r}")


def filled(
    config: Mapping[str, Any], fields: Sequence[str], required: Sequence[str], defaults: dict
) -> dict[str, Any]:
    """config with defaults filled in; ValueError for a field not in fields, a required one
    missing, a dtype that names no floating-point torch dtype, a provenance that is not an
    object (an SAE's config here, a cross-layer transcoder's in sae_fast.clt.config)."""
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    missing = [name for name in required if name not in config]
    if missing:
        raise ValueError(f"missing fields {missing}")
    full = {**defaults, **config}
    if not isinstance(full["dtype"], str) or parse_dtype(full["dtype"]) is None:
        raise ValueError(f"dtype must name a floating-point torch dtype, got {full['dtype']!r}")
    if not isinstance(full["provenance"], dict):
        raise ValueError(f"provenance must be an object, got {full['provenance']!r}")
    return full


def complete(config: Mapping[str, Any]) -> dict[str, Any]:
    """config with its defaults filled in, checked: ValueError/TypeError naming what is wrong."""
    full = filled(config, FIELDS, REQUIRED, DEFAULTS)
    provenance = full["provenance"]
    for key, kind in PROVENANCE_KEYS.items():
        value = provenance.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"provenance.{key} must be {kind.__name__}, got {value!r}")
    full["provenance"] = dict(provenance)
    hyper = ("dtype", "provenance")
    check_hyperparameters(**{name: full[name] for name in FIELDS if name not in hyper})
    return full


def output_width(config: Mapping[str, Any]) -> int:
    """The width of what the SAE outputs: d_out where given, else d_in."""
    return config.get("d_out") or config["d_in"]


def dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The parameter dtype a checked config names."""
    return parse_dtype(config["dtype"])


def tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors an SAE of this (checked) config holds, by name, with their shapes.

    W_enc (m, d), W_dec (m, d_out), b_enc (m,), b_dec (d_out,) (d_out: d_in but for a
    transcoder's); a skip connection adds W_skip (d_out, d); jumprelu log_threshold (m,);
    gated r_mag and b_mag (m,) (b_enc is its gate bias); batchtopk the scalar threshold.
    """
    m, d, activation = config["n_latents"], config["d_in"], config["activation"]
    d_out = output_width(config)
    shapes: dict[str, tuple[int, ...]] = {"W_dec": (m, d_out), "W_enc": (m, d), "b_enc": (m,)}
    shapes["b_dec"] = (d_out,)
    if config.get("skip_connection"):
        shapes["W_skip"] = (d_out, d)
    if activation == "jumprelu":
        shapes["log_threshold"] = (m,)
    if activation == "gated":
        shapes["r_mag"] = shapes["b_mag"] = (m,)
    if activation == "batchtopk":
        shapes["threshold"] = ()
    return shapes
