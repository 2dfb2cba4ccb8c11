"""An SAE's config without the module: its fields, their checks, and the tensors it implies.

The config is the JSON-able dict that rebuilds a SparseAutoencoder (its cfg.json): d_in,
n_latents, k, activation, dtype, jumprelu_bandwidth, input_norm, matryoshka (the nested
prefix sizes of a Matryoshka SAE, or None), and provenance: what the SAE
was trained on (PROVENANCE_KEYS; empty when unknown). Checkpoint formats read and
write (config, tensors) with these helpers and never import the module, which builds itself
from the pair (SparseAutoencoder.from_config).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import torch

from .options import ACTIVATIONS, INPUT_NORMS, SPARSE_ACTIVATIONS
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
    "provenance",
)
REQUIRED = ("d_in", "n_latents", "dtype")
DEFAULTS: dict[str, Any] = {
    "k": None,
    "activation": "topk",
    "jumprelu_bandwidth": 1e-3,
    "input_norm": "none",
    "matryoshka": None,
    "provenance": {},
}
# What provenance says, with the type of each: the model and hook point (as sae_fast names
# them), the text, the activations trained on (tokens) and the steps, the sae_fast version,
# the source's own description and the training options. Other keys (a newer sae_fast's)
# are kept as they are.
PROVENANCE_KEYS = {
    "model": str,
    "hook": str,
    "text": str,
    "tokens": int,
    "step": int,
    "sae_fast_version": str,
    "source": dict,
    "train": dict,
}


def check_hyperparameters(
    d_in: object,
    n_latents: object,
    k: object,
    activation: object,
    input_norm: object,
    jumprelu_bandwidth: object,
    matryoshka: object = None,
) -> None:
    """Raise ValueError (TypeError for a k that is not an int) naming the first bad field."""
    check_int(d_in, "d_in")
    check_int(n_latents, "n_latents")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if activation in SPARSE_ACTIVATIONS:
        if k is None:
            raise ValueError(f"k is required for activation={activation!r}")
        check_k(k, n_latents)
    elif k is not None:
        raise ValueError(f"k is only used by activations {SPARSE_ACTIVATIONS}, not {activation!r}")
    if jumprelu_bandwidth <= 0:
        raise ValueError(f"jumprelu_bandwidth must be > 0, got {jumprelu_bandwidth}")
    if matryoshka is not None:
        check_matryoshka(matryoshka, n_latents, activation)


def check_matryoshka(prefixes: object, n_latents: int, activation: object) -> None:
    """A Matryoshka SAE's prefix sizes: ascending ints in 1..n_latents ending at n_latents,
    on a TopK or BatchTopK SAE; ValueError says what is wrong."""
    if activation not in SPARSE_ACTIVATIONS:
        raise ValueError(f"matryoshka needs activation topk or batchtopk, not {activation!r}")
    if (
        not isinstance(prefixes, list | tuple)
        or not prefixes
        or any(isinstance(p, bool) or not isinstance(p, int) for p in prefixes)
        or any(a >= b for a, b in pairwise(prefixes))
        or prefixes[0] < 1
        or prefixes[-1] != n_latents
    ):
        raise ValueError(
            f"matryoshka must be ascending prefix sizes ending at n_latents={n_latents}, got "
            f"{prefixes!r}"
        )


def parse_matryoshka(spec: str, n_latents: int) -> list[int] | None:
    """'1024,4096' as prefix sizes for n_latents latents (n_latents appended when the last is
    smaller: the whole dictionary is the last prefix; the whole dictionary alone is a plain
    SAE, None); ValueError says what is wrong."""
    try:
        prefixes = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"expected prefix sizes like 1024,4096, got {spec!r}") from None
    if prefixes and prefixes[-1] < n_latents:
        prefixes.append(n_latents)
    check_matryoshka(prefixes, n_latents, "topk")
    return prefixes if len(prefixes) > 1 else None


def complete(config: Mapping[str, Any]) -> dict[str, Any]:
    """config with its defaults filled in, checked: ValueError/TypeError naming what is wrong."""
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    missing = [name for name in REQUIRED if name not in config]
    if missing:
        raise ValueError(f"missing fields {missing}")
    full = {**DEFAULTS, **config}
    if not isinstance(full["dtype"], str) or parse_dtype(full["dtype"]) is None:
        raise ValueError(f"dtype must name a floating-point torch dtype, got {full['dtype']!r}")
    provenance = full["provenance"]
    if not isinstance(provenance, dict):
        raise ValueError(f"provenance must be an object, got {provenance!r}")
    for key, kind in PROVENANCE_KEYS.items():
        value = provenance.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"provenance.{key} must be {kind.__name__}, got {value!r}")
    full["provenance"] = dict(provenance)
    hyper = ("dtype", "provenance")
    check_hyperparameters(**{name: full[name] for name in FIELDS if name not in hyper})
    return full


def dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The parameter dtype a checked config names."""
    return parse_dtype(config["dtype"])


def tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors an SAE of this (checked) config holds, by name, with their shapes.

    W_enc, W_dec (m, d), b_enc (m,), b_dec (d,); jumprelu adds log_threshold (m,); gated
    r_mag and b_mag (m,) (b_enc is its gate bias); batchtopk the scalar threshold.
    """
    m, d, activation = config["n_latents"], config["d_in"], config["activation"]
    shapes: dict[str, tuple[int, ...]] = {"W_dec": (m, d), "W_enc": (m, d), "b_enc": (m,)}
    shapes["b_dec"] = (d,)
    if activation == "jumprelu":
        shapes["log_threshold"] = (m,)
    if activation == "gated":
        shapes["r_mag"] = shapes["b_mag"] = (m,)
    if activation == "batchtopk":
        shapes["threshold"] = ()
    return shapes
