"""circuit-tracer's cross-layer transcoder layout (its load_clt and to_safetensors).

A folder of W_enc_{i}.safetensors (W_enc_i (m, d), b_enc_i (m,), b_dec_i (d,), and
threshold_i (m,) for a JumpReLU CLT, ReLU without) and W_dec_{i}.safetensors (W_dec_i
(m, L - i, d)) for i < L, and config.yaml naming the model kind and the hook points features
read from and write to (inside each TransformerLens block; ours: provenance hooks_in and
hooks_out, one per layer). circuit-tracer computes pre = x @ W_enc_i.T + b_enc_i and keeps
pre where pre > threshold: ours with log_threshold = log(threshold), so thresholds round
trip within an ulp of the log, every other tensor bit for bit.

Its CLTs have no TopK and no stored skip connection, and one width d for inputs and outputs:
saving another CLT is refused, saying how to get one it holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..files import atomic_path, read_text
from ..validation import dtype_name
from .clt_native import PLAIN_ACTIVATIONS, check_plain, checked
from .folder import read_weights, write_weights
from .registry import Config, Format, Tensors, register

NAME = "circuit-tracer"
CONFIG_YAML = "config.yaml"
MODEL_KIND = "cross_layer_transcoder"
# circuit-tracer's hook names (TransformerLens's, inside a block) where none is known.
DEFAULT_HOOKS = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
_ENCODER = re.compile(r"W_enc_([0-9]+)\.safetensors")


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "W_enc_0.safetensors").exists()


def _n_layers(path: Path) -> int:
    found = sorted(int(m[1]) for p in path.iterdir() if (m := _ENCODER.fullmatch(p.name)))
    if found != list(range(len(found))):
        raise CheckpointError(f"{path}: encoder files must be W_enc_0 .. W_enc_(L-1), got {found}")
    return len(found)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file at path ({} when absent): CheckpointError otherwise."""
    if not path.exists():
        return {}
    import yaml

    try:
        body = yaml.safe_load(read_text(path, CheckpointError))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not YAML: {e}") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{path} holds a {type(body).__name__}, not a mapping")
    return body


def load(path: Path) -> tuple[Config, Tensors]:
    meta = read_yaml(path / CONFIG_YAML)
    if meta.get("model_kind", MODEL_KIND) != MODEL_KIND:
        raise CheckpointError(
            f"{path / CONFIG_YAML}: model_kind {meta['model_kind']!r}, not {MODEL_KIND!r}"
        )
    L = _n_layers(path)
    layers = [read_weights(path / f"W_enc_{i}.safetensors") for i in range(L)]
    jumprelu = "threshold_0" in layers[0]
    dtype = layers[0]["W_enc_0"].dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, key in (("W_enc", "W_enc"), ("b_enc", "b_enc"), ("b_dec", "b_dec")):
        tensors[name] = torch.stack([_get(path, layers[i], f"{key}_{i}", i) for i in range(L)])
    if jumprelu:
        threshold = torch.stack([_get(path, layers[i], f"threshold_{i}", i) for i in range(L)])
        if not bool((threshold > 0).all()):
            raise CheckpointError(
                f"{path}: some thresholds are <= 0; sae_fast's JumpReLU holds log thresholds"
            )
        tensors["log_threshold"] = threshold.double().log().to(dtype)
    for i in range(L):
        decoder = read_weights(path / f"W_dec_{i}.safetensors")
        tensors[f"W_dec.{i}"] = _get(path, decoder, f"W_dec_{i}", i)
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    m, d = tensors["W_enc"].shape[1:]
    provenance = {"model": meta["model_name"]} if isinstance(meta.get("model_name"), str) else {}
    for key, name in (("hooks_in", "feature_input_hook"), ("hooks_out", "feature_output_hook")):
        if isinstance(meta.get(name), str):  # a hook point inside each TransformerLens block
            provenance[key] = [f"blocks.{i}.{meta[name]}" for i in range(L)]
    config = {
        "n_layers": L,
        "d_in": d,
        "n_latents": m,
        "activation": "jumprelu" if jumprelu else "relu",
        "dtype": dtype_name(dtype),
        "provenance": provenance,
    }
    return checked(str(path), config, tensors)


def _get(path: Path, tensors: Tensors, key: str, layer: int) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path}: layer {layer}'s file has no {key}")
    return tensors[key]


def block_hook(hooks: object, n_layers: int) -> str | None:
    """The hook point inside each TransformerLens block that hooks (one per layer,
    blocks.{i}.NAME) name, as circuit-tracer's config.yaml says it: NAME; None when they name
    no such pattern (sae_fast's friendly names, another library's)."""
    if not isinstance(hooks, list) or len(hooks) != n_layers:
        return None
    if any(not isinstance(h, str) or not h.startswith(f"blocks.{i}.") for i, h in enumerate(hooks)):
        return None
    names = {hook.removeprefix(f"blocks.{i}.") for i, hook in enumerate(hooks)}
    return names.pop() if len(names) == 1 else None


def save(config: Config, tensors: Tensors, path: Path) -> None:
    check_plain(config, NAME)
    L = config["n_layers"]
    for i in range(L):
        layer = {
            f"W_enc_{i}": tensors["W_enc"][i],
            f"b_enc_{i}": tensors["b_enc"][i],
            f"b_dec_{i}": tensors["b_dec"][i],
        }
        if config["activation"] == "jumprelu":
            log_t = tensors["log_threshold"][i]
            layer[f"threshold_{i}"] = log_t.double().exp().to(log_t.dtype)
        write_weights(path / f"W_enc_{i}.safetensors", layer)
        write_weights(path / f"W_dec_{i}.safetensors", {f"W_dec_{i}": tensors[f"W_dec.{i}"]})
    provenance = config.get("provenance") or {}
    meta = {"model_kind": MODEL_KIND, "model_name": provenance.get("model")}
    for key, name in (("hooks_in", "feature_input_hook"), ("hooks_out", "feature_output_hook")):
        meta[name] = block_hook(provenance.get(key), L) or DEFAULT_HOOKS[name]
    with atomic_path(path / CONFIG_YAML) as tmp:
        import yaml

        tmp.write_text(yaml.safe_dump({k: v for k, v in meta.items() if v is not None}))


FILES = ("W_enc_*.safetensors", "W_dec_*.safetensors", CONFIG_YAML)
register(Format(NAME, detect, load, save, files=FILES, kind="clt", activations=PLAIN_ACTIVATIONS))
