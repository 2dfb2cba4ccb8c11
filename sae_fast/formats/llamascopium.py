"""Language-Model-SAEs' (llamascopium's) cross-layer transcoder layout.

sae_weights.safetensors holds W_E (L, d, m), b_E (L, m), the decoders indexed by target
layer, W_D.{t} (t + 1, m, d) (row s: source layer s's features writing to t), b_D.{t} (d,),
and for JumpReLU activation_function.log_jumprelu_threshold (L, m); config.json says
"sae_type": "clt", with d_model, expansion_factor, act_fn, the hook points and the
normalisation. Its encoder computes pre = x @ W_E[l] + b_E[l], no centring, as ours does.

Reading folds what is linear, so ours computes the same function: with
sparsity_include_decoder_norm a JumpReLU feature fires where pre * ||W_dec|| > threshold,
ours with the threshold divided by that decoder norm (over every target); a dataset-wise
normalisation with its stored average norms (x scaled by sqrt(d) / norm) is folded into the
biases, thresholds and decoders. ReLU and JumpReLU CLTs only: its TopK rules select by
other keys than ours. Saving writes the inference layout: no decoder norm in the
activation, normalisation folded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..clt.config import decoder_norms
from ..files import peek_json, read_json
from ..validation import dtype_name
from .clt_native import PLAIN_ACTIVATIONS, check_plain, checked
from .folder import check_names, read_weights, write
from .registry import Config, Format, Tensors, register

NAME = "llamascopium"
CONFIG_JSON = "config.json"
WEIGHTS_FILE = "sae_weights.safetensors"
THRESHOLD = "activation_function.log_jumprelu_threshold"
NORM = "dataset_average_activation_norm."


def detect(path: Path) -> bool:
    body = peek_json(path / CONFIG_JSON) if path.is_dir() else None
    return (body or {}).get("sae_type") == "clt"


def load(path: Path) -> tuple[Config, Tensors]:
    where = path / CONFIG_JSON
    meta: dict[str, Any] = read_json(where, CheckpointError)
    act_fn = meta.get("act_fn")
    if act_fn not in ("relu", "jumprelu"):
        raise CheckpointError(
            f"{where}: act_fn {act_fn!r}; sae_fast reads llamascopium's relu and jumprelu CLTs"
        )
    hooks_in, hooks_out = meta.get("hook_points_in"), meta.get("hook_points_out")
    if not isinstance(hooks_in, list) or not isinstance(hooks_out, list) or not hooks_in:
        raise CheckpointError(f"{where}: hook_points_in and hook_points_out must be lists")
    if len(hooks_in) != len(hooks_out):
        raise CheckpointError(f"{where}: as many hook_points_in as hook_points_out are needed")
    weights = read_weights(path / WEIGHTS_FILE)
    L = len(hooks_in)
    bias = meta.get("use_decoder_bias", True)
    names = {"W_E", "b_E", *(f"W_D.{t}" for t in range(L))}
    names |= {f"b_D.{t}" for t in range(L)} if bias else set()
    names |= {THRESHOLD} if act_fn == "jumprelu" else set()
    norm_mode = meta.get("norm_activation", "dataset-wise")
    norms = {name for name in weights if name.startswith(NORM)}
    check_names(str(path / WEIGHTS_FILE), weights, names | norms)
    W_E = weights["W_E"]
    dtype = W_E.dtype
    f64 = {name: t.double() for name, t in weights.items()}
    d, m = W_E.shape[1:]
    in_scale = out_scale = [1.0] * L
    if norm_mode == "dataset-wise" and norms:
        in_scale = [_scale(where, f64, h, d) for h in hooks_in]
        out_scale = [_scale(where, f64, h, d) for h in hooks_out]
    elif norm_mode != "inference":
        raise CheckpointError(
            f"{where}: norm_activation {norm_mode!r} scales by norms each batch or token has, "
            "which no fixed CLT computes; save it with the normalisation folded (inference)"
        )
    # (m, L - s, d) per source s, from the decoders stored per target t.
    stored = [torch.stack([f64[f"W_D.{t}"][s] for t in range(s, L)], 1) for s in range(L)]
    out = torch.tensor(out_scale, dtype=torch.float64)
    W_dec = [W * in_scale[s] / out[s:, None] for s, W in enumerate(stored)]
    tensors = {
        "W_enc": f64["W_E"].transpose(1, 2),
        "b_enc": f64["b_E"] / torch.tensor(in_scale, dtype=torch.float64)[:, None],
        "b_dec": torch.stack([f64[f"b_D.{t}"] / out_scale[t] for t in range(L)])
        if bias
        else torch.zeros(L, d, dtype=torch.float64),
        **{f"W_dec.{s}": W for s, W in enumerate(W_dec)},
    }
    if act_fn == "jumprelu":
        log_t = f64[THRESHOLD] - torch.tensor(in_scale, dtype=torch.float64).log()[:, None]
        if meta.get("sparsity_include_decoder_norm", True):
            log_t = log_t - decoder_norms(stored).log()  # the norms as stored, unfolded
        tensors["log_threshold"] = log_t
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    config = {
        "n_layers": L,
        "d_in": d,
        "n_latents": m,
        "activation": act_fn,
        "dtype": dtype_name(dtype),
        "provenance": {"hooks_in": hooks_in, "hooks_out": hooks_out},
    }
    return checked(str(path), config, tensors)


def _scale(where: Path, weights: Tensors, hook: str, d: int) -> float:
    if NORM + hook not in weights:
        raise CheckpointError(f"{where}: no stored average norm for {hook}")
    return math.sqrt(d) / float(weights[NORM + hook])


def save(config: Config, tensors: Tensors, path: Path) -> None:
    check_plain(config, NAME)
    L, m, d = config["n_layers"], config["n_latents"], config["d_in"]
    if int(d * (m / d)) != m:
        raise CheckpointError(
            f"llamascopium derives d_sae = int(d_model * expansion_factor), which gives "
            f"{int(d * (m / d))} for n_latents={m}, d_model={d}: choose another n_latents"
        )
    provenance = config.get("provenance") or {}
    hooks_in = provenance.get("hooks_in") or [f"layers.{i}.in" for i in range(L)]
    hooks_out = provenance.get("hooks_out") or [f"layers.{i}.out" for i in range(L)]
    weights = {"W_E": tensors["W_enc"].transpose(1, 2)}
    weights["b_E"] = tensors["b_enc"]
    for t in range(L):
        weights[f"W_D.{t}"] = torch.stack([tensors[f"W_dec.{s}"][:, t - s] for s in range(t + 1)])
        weights[f"b_D.{t}"] = tensors["b_dec"][t]
    if config["activation"] == "jumprelu":
        weights[THRESHOLD] = tensors["log_threshold"]
    meta = {
        "sae_type": "clt",
        "d_model": d,
        "expansion_factor": m / d,
        "act_fn": config["activation"],
        "use_decoder_bias": True,
        "norm_activation": "inference",
        "sparsity_include_decoder_norm": False,
        "hook_points_in": list(hooks_in),
        "hook_points_out": list(hooks_out),
    }
    write(path, WEIGHTS_FILE, weights, meta, config_file=CONFIG_JSON)


register(
    Format(NAME, detect, load, save, files=(WEIGHTS_FILE, CONFIG_JSON), kind="clt",
           activations=PLAIN_ACTIVATIONS)
)  # fmt: skip
