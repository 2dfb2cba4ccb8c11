"""saprmarks/dictionary_learning: a folder with ae.pt (a torch state dict) and config.json.

config.json is {"trainer": {"dict_class": ..., "activation_dim": d, "dict_size": m, "k": ...},
"buffer": {...}}; dict_class names the module whose state dict ae.pt holds. A bare ae.pt (or
any .pt with config.json beside it, or in the folder above checkpoints/ for the ae_<step>.pt
files saved while training) loads too. ae.pt is read with weights_only=True only.

How each class maps onto ours (their forward, as written in their source):
  AutoEncoder          relu(encoder(x - bias)); decoder(f) + bias                  -> relu
  AutoEncoderNew       relu(encoder(x)); decoder(f), decoder has the bias          -> relu (*)
  AutoEncoderTopK      top-k of relu(encoder(x - b_dec)); threshold unused by forward -> topk
  BatchTopKSAE         relu(pre) * (relu(pre) > threshold) at inference (**)     -> batchtopk
  MatryoshkaBatchTopKSAE  as BatchTopKSAE, with W_enc (d, m) and W_dec (m, d)    -> batchtopk
                       (its group_sizes buffer -> matryoshka, the prefixes' running sums)
  JumpReluAutoEncoder  relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc (*) -> jumprelu
  GatedAutoEncoder     gate 1[pi_gate > 0], magnitude relu(exp(r_mag) * Wx + mag_bias),
                       both on x - decoder_bias                                   -> gated
(*) their encoder does not subtract b_dec: b_dec is folded into b_enc (exact up to rounding).
(**) a threshold < 0 (never calibrated) keeps every positive latent there, which threshold 0
does here; checkpoints from before the threshold existed run batch top-k, as ours does
uncalibrated (threshold -1). JumpReLU thresholds <= 0 act as 0 (their relu), log_threshold
-inf here.
Latents are those of their forward on the stored weights; AutoEncoder.from_pretrained's
default normalize_decoder=True would instead rescale them by the decoder norms (same x_hat).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from ..files import atomic_path, read_json
from ..options import SPARSE_ACTIVATIONS
from . import layout
from .registry import Config, Format, Tensors, register

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class _Class:
    """One dictionary class: its activation, its key for each of our tensors, its quirks."""

    activation: str
    keys: dict[str, str]  # our name -> their state-dict key
    transposed: frozenset[str]  # ours stored (d, m) there (nn.Linear decoder, raw W_enc)
    subtracts_b_dec: bool = True  # their encoder sees x - b_dec
    extras: frozenset[str] = frozenset()  # buffers they may also hold (older versions lack them)


_LINEAR = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "decoder.weight"}
_RAW = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
_DEC_T, _ENC_T = frozenset({"W_dec"}), frozenset({"W_enc"})
_TOPK_BUFFERS = frozenset({"k", "threshold"})

_CLASSES: dict[str, _Class] = {
    "AutoEncoder": _Class("relu", {**_LINEAR, "b_dec": "bias"}, _DEC_T),
    "AutoEncoderNew": _Class("relu", {**_LINEAR, "b_dec": "decoder.bias"}, _DEC_T, False),
    "AutoEncoderTopK": _Class("topk", {**_LINEAR, "b_dec": "b_dec"}, _DEC_T, True, _TOPK_BUFFERS),
    "BatchTopKSAE": _Class("batchtopk", {**_LINEAR, "b_dec": "b_dec"}, _DEC_T, True, _TOPK_BUFFERS),
    "MatryoshkaBatchTopKSAE": _Class(
        "batchtopk", _RAW, _ENC_T, True, _TOPK_BUFFERS | {"group_sizes"}
    ),
    "JumpReluAutoEncoder": _Class(
        "jumprelu", {**_RAW, "log_threshold": "threshold"}, _ENC_T, subtracts_b_dec=False
    ),
    "GatedAutoEncoder": _Class(
        "gated",
        {
            "W_enc": "encoder.weight",
            "b_enc": "gate_bias",
            "W_dec": "decoder.weight",
            "b_dec": "decoder_bias",
            "r_mag": "r_mag",
            "b_mag": "mag_bias",
        },
        _DEC_T,
    ),
}
# What save writes for each of our activations: (dict_class, the trainer that makes it).
_SAVED_AS = {
    "relu": ("AutoEncoder", "StandardTrainer"),
    "topk": ("AutoEncoderTopK", "TopKTrainer"),
    "batchtopk": ("BatchTopKSAE", "BatchTopKTrainer"),
    "matryoshka": ("MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer"),
    "jumprelu": ("JumpReluAutoEncoder", "JumpReluTrainer"),
    "gated": ("GatedAutoEncoder", "GatedSAETrainer"),
}


def _files(path: Path) -> tuple[Path, Path]:
    """(ae.pt, config.json) for a folder or a weights file."""
    if path.is_dir():
        return path / WEIGHTS_FILE, path / CONFIG_FILE
    config = path.parent / CONFIG_FILE
    if not config.is_file() and path.parent.name == "checkpoints":
        config = path.parent.parent / CONFIG_FILE  # trainSAE's checkpoints/ae_<step>.pt
    return path, config


def detect(path: Path) -> bool:
    """A folder holding ae.pt, or a .pt file with config.json beside it (or named ae.pt)."""
    weights, config = _files(path)
    if path.is_dir():
        return weights.is_file()
    return path.suffix == ".pt" and (path.name == WEIGHTS_FILE or config.is_file())


def _trainer_config(weights: Path, config: Path) -> dict[str, Any]:
    if not config.is_file():
        raise CheckpointError(
            f"{weights} has no {CONFIG_FILE} beside it: dictionary_learning needs it to know "
            "the dictionary class (trainer.dict_class)"
        )
    body = read_json(config, CheckpointError)
    trainer = body.get("trainer") if isinstance(body, dict) else None
    if not isinstance(trainer, dict) or not isinstance(trainer.get("dict_class"), str):
        raise CheckpointError(f"{config} has no trainer.dict_class")
    return trainer


def _sizes(where: str, trainer: dict, state: dict, cls: _Class) -> tuple[int, int]:
    """(d, m) from config.json, or from the encoder weight where the config lacks them."""
    if "activation_dim" in trainer and "dict_size" in trainer:
        d = layout.get_int(where, "activation_dim", trainer["activation_dim"])
        return d, layout.get_int(where, "dict_size", trainer["dict_size"])
    key = cls.keys["W_enc"]
    weight = state.get(key)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise CheckpointError(f"{where}: no 2-d {key!r} to take the sizes from")
    d, m = weight.shape if "W_enc" in cls.transposed else weight.shape[::-1]
    return d, m


def _k(where: str, state: dict, trainer: dict) -> int:
    # The buffer is what their forward uses (a k annealed during training changes it in place;
    # the config keeps the target); checkpoints from before the buffer existed have only the config.
    if "k" in state:
        return layout.get_int(where, "the k buffer", state["k"])
    if "k" in trainer:
        return layout.get_int(where, "trainer.k", trainer["k"])
    raise CheckpointError(f"{where}: k is neither in the state dict nor in config.json")


def _batchtopk_threshold(where: str, state: dict) -> float:
    if "threshold" not in state:
        return -1.0  # their forward before the threshold existed: batch top-k, ours uncalibrated
    value = state["threshold"]
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise CheckpointError(f"{where}: threshold must be a one-element tensor, got {value!r}")
    # Below 0 their forward keeps relu(pre) > threshold, every positive latent: threshold 0 here.
    return max(float(value.item()), 0.0)


def load(path: Path) -> tuple[Config, Tensors]:
    weights, config = _files(path)
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    trainer = _trainer_config(weights, config)
    name = trainer["dict_class"]
    if name not in _CLASSES:
        raise CheckpointError(
            f"{config}: dict_class {name!r} is not one sae_fast reads ({', '.join(_CLASSES)})"
        )
    cls = _CLASSES[name]
    state = layout.read_torch_file(weights)
    unexpected = sorted(set(state) - set(cls.keys.values()) - cls.extras)
    if unexpected:
        raise CheckpointError(
            f"{weights} holds {unexpected}, which {name} does not have: is dict_class right?"
        )
    d, m = _sizes(str(weights), trainer, state, cls)
    where = f"{weights} ({name}, activation_dim={d}, dict_size={m})"
    shapes = {"W_enc": (m, d), "W_dec": (m, d), "b_dec": (d,)}
    tensors = {}
    for ours, theirs in cls.keys.items():
        shape = shapes.get(ours, (m,))
        flipped = ours in cls.transposed
        value = layout.get_tensor(where, state, theirs, shape[::-1] if flipped else shape)
        tensors[ours] = value.T if flipped else value
    if not cls.subtracts_b_dec:
        tensors["b_enc"] = layout.shift_encoder_bias(
            tensors["W_enc"], tensors["b_enc"], tensors["b_dec"], +1
        )
    if cls.activation == "jumprelu":
        tensors["log_threshold"] = tensors["log_threshold"].clamp_min(0).log()
    k = _k(where, state, trainer) if cls.activation in SPARSE_ACTIVATIONS else None
    if cls.activation == "batchtopk":
        tensors["threshold"] = torch.tensor(_batchtopk_threshold(where, state))
    prefixes = _prefixes(where, state, m) if "group_sizes" in state else None
    bandwidth = trainer.get("bandwidth", 1e-3) if cls.activation == "jumprelu" else 1e-3
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int | float):
        raise CheckpointError(f"{config}: trainer.bandwidth must be a number, got {bandwidth!r}")
    return layout.assemble(
        where,
        tensors,
        activation=cls.activation,
        k=k,
        jumprelu_bandwidth=float(bandwidth),
        matryoshka=prefixes,
    )


def _prefixes(where: str, state: dict, m: int) -> list[int]:
    """A Matryoshka dictionary's prefix sizes: the running sums of its group_sizes."""
    sizes = state["group_sizes"]
    if not isinstance(sizes, Tensor) or sizes.dim() != 1 or sizes.is_floating_point():
        raise CheckpointError(f"{where}: group_sizes must be a 1-d integer tensor")
    prefixes = torch.cumsum(sizes, 0).tolist()
    if prefixes[-1:] != [m] or any(s <= 0 for s in sizes.tolist()):
        raise CheckpointError(
            f"{where}: group_sizes {sizes.tolist()} must be positive and sum to dict_size={m}"
        )
    return prefixes


def save(config: Config, tensors: Tensors, path: Path) -> None:
    """Write folder path: ae.pt in the layout of the class _SAVED_AS names, then config.json."""
    activation, input_norm = config["activation"], config["input_norm"]
    if input_norm != "none":
        raise CheckpointError(
            f"dictionary_learning has no input normalisation; this SAE uses {input_norm!r}"
        )
    if config["matryoshka"] is not None and activation != "batchtopk":
        raise CheckpointError(
            f"dictionary_learning's Matryoshka dictionary is BatchTopK; this one is {activation!r}"
        )
    kind = "matryoshka" if config["matryoshka"] is not None else activation
    name, trainer_class = _SAVED_AS[kind]
    cls = _CLASSES[name]
    ours = dict(tensors)
    if not cls.subtracts_b_dec:
        ours["b_enc"] = layout.shift_encoder_bias(ours["W_enc"], ours["b_enc"], ours["b_dec"], -1)
    if activation == "jumprelu":
        ours["log_threshold"] = ours["log_threshold"].exp()
    state: dict[str, Any] = {
        theirs: ours[o].T if o in cls.transposed else ours[o] for o, theirs in cls.keys.items()
    }
    trainer: dict[str, Any] = {
        "dict_class": name,
        "trainer_class": trainer_class,
        "activation_dim": config["d_in"],
        "dict_size": config["n_latents"],
    }
    if activation in SPARSE_ACTIVATIONS:
        threshold = ours.get("threshold", torch.tensor(-1.0))  # topk: their unused default
        if activation == "batchtopk" and threshold < 0:
            raise CheckpointError(
                f"this batchtopk SAE has no calibrated threshold; dictionary_learning's {name} "
                "would run it with threshold -1, keeping every positive latent"
            )
        state["k"], state["threshold"] = torch.tensor(config["k"], dtype=torch.int32), threshold
        trainer["k"] = config["k"]
    if activation == "jumprelu":
        trainer["bandwidth"] = config["jumprelu_bandwidth"]
    if config["matryoshka"] is not None:
        sizes = [b - a for a, b in pairwise([0, *config["matryoshka"]])]
        state["group_sizes"] = torch.tensor(sizes)
        # Their trainer rebuilds sizes as int(fraction * dict_size): the sizes are exact.
        trainer["group_sizes"] = sizes
        trainer["group_fractions"] = [s / config["n_latents"] for s in sizes]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    layout.write_torch_file(folder / WEIGHTS_FILE, state)
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps({"trainer": trainer}, indent=4) + "\n")


register(Format("dictionary_learning", detect, load, save, files=(WEIGHTS_FILE, CONFIG_FILE)))
