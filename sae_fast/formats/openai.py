"""openai/sparse_autoencoder: one torch state-dict file (.pt), as Autoencoder.state_dict() saves.

Keys: pre_bias (d), encoder.weight (m, d), latent_bias (m), decoder.weight (d, m), the
statistics buffers (stats_last_nonzero, latents_activation_frequency, latents_mean_square;
ignored), and the activation: "activation" (class name; absent means ReLU) and
"activation_state_dict" ({"k": k, "postact_fn": "ReLU"} for TopK). Their from_state_dict turns
input LayerNorm on exactly when the activation is TopK; so does this module.

Their forward: x, mu, std = LN(x) (TopK only); pre = encoder(x - pre_bias) + latent_bias;
TopK keeps torch.topk(pre, k) and applies ReLU to the kept values; x_hat = decoder(z) +
pre_bias, then x_hat * std + mu. Ours is that with b_dec = pre_bias, W_dec = decoder.weight.T
and input_norm="layer_norm". Top-k of pre then ReLU equals top-k of relu(pre): where a row has
fewer than k positive pre-activations both keep every positive one, and the other kept entries
are zero either way.

A file path, or a folder holding exactly one .pt or .pth file, is read with weights_only=True
only. Save writes a .pt path as given, or autoencoder.pt inside a folder path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from . import layout
from .registry import Config, Format, Tensors, register

SUFFIXES = (".pt", ".pth")
SAVED_NAME = "autoencoder.pt"
_REQUIRED = frozenset({"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"})
_STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
_ACTIVATION_KEYS = ("activation", "activation_state_dict")


def _file(path: Path) -> Path | None:
    """The checkpoint file: path itself, or the one .pt/.pth file in folder path."""
    if path.is_file():
        return path if path.suffix in SUFFIXES else None
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES]
        return files[0] if len(files) == 1 else None
    return None


def _is_file(path: Path) -> bool:
    """Whether save writes path itself (a .pt/.pth name) rather than a folder."""
    return path.suffix in SUFFIXES


def detect(path: Path) -> bool:
    """A .pt/.pth file (or a folder with exactly one) whose dict holds openai's keys.

    A lone .pt file that cannot be read is claimed too, so that loading says why (damaged, or
    refused as unsafe) rather than that no format matched (dictionary_learning, asked first,
    takes the .pt files that have its config.json beside them).
    """
    file = _file(path)
    if file is None:
        return False
    keys = layout.peek_keys(file)
    if keys is None:
        return file == path
    return keys >= _REQUIRED


def _activation(where: str, state: dict[str, Any]) -> tuple[str, int | None]:
    """(our activation, k) from their activation entries."""
    name = state.get("activation", "ReLU")
    if name == "ReLU":
        return "relu", None
    if name != "TopK":
        raise CheckpointError(
            f"{where}: activation {name!r} is not one sae_fast runs (ReLU, TopK); "
            "Identity has no sparsity"
        )
    params = state.get("activation_state_dict")
    if not isinstance(params, dict) or "k" not in params:
        raise CheckpointError(f"{where}: TopK without activation_state_dict['k']")
    postact = params.get("postact_fn", "ReLU")
    if postact != "ReLU":
        # Without the ReLU the kept values can be negative, which our TopK never produces.
        raise CheckpointError(f"{where}: TopK with postact_fn {postact!r}; sae_fast needs ReLU")
    return "topk", layout.get_int(where, "activation_state_dict['k']", params["k"])


def load(path: Path) -> tuple[Config, Tensors]:
    file = _file(path)
    if file is None:
        raise CheckpointError(f"{path} is not a .pt/.pth file or a folder holding exactly one")
    state = layout.read_torch_file(file)
    if "decoder.linear.weight" in state and "decoder.weight" not in state:
        raise CheckpointError(f"{file}: tied decoder (decoder.linear.weight) is not supported")
    unexpected = sorted(set(state) - _REQUIRED - set(_STATS) - set(_ACTIVATION_KEYS))
    if unexpected:
        raise CheckpointError(f"{file} holds {unexpected}, which an openai Autoencoder has not")
    missing = sorted(_REQUIRED - set(state))
    if missing:
        raise CheckpointError(f"{file}: missing {missing} (found {sorted(state)})")
    encoder = state["encoder.weight"]
    if not isinstance(encoder, Tensor) or encoder.dim() != 2:
        raise CheckpointError(f"{file}: encoder.weight must be a 2-d tensor (m, d)")
    m, d = encoder.shape
    where = f"{file} (n_latents={m}, d={d} from encoder.weight)"
    activation, k = _activation(where, state)
    tensors = {
        "W_enc": encoder,
        "b_enc": layout.get_tensor(where, state, "latent_bias", (m,)),
        "W_dec": layout.get_tensor(where, state, "decoder.weight", (d, m)).T,
        "b_dec": layout.get_tensor(where, state, "pre_bias", (d,)),
    }
    return layout.assemble(
        where,
        tensors,
        activation=activation,
        k=k,
        input_norm="layer_norm" if activation == "topk" else "none",
    )


def save(config: Config, ours: Tensors, path: Path) -> None:
    """Write the state dict their Autoencoder.from_state_dict loads: ReLU, or TopK with LN."""
    activation, input_norm = config["activation"], config["input_norm"]
    wanted = {"relu": "none", "topk": "layer_norm"}
    if activation not in wanted:
        raise CheckpointError(f"openai's Autoencoder has no {activation!r} activation")
    if input_norm != wanted[activation]:
        # Their loader decides LayerNorm from the activation alone (TopK <=> LN).
        raise CheckpointError(
            f"openai's Autoencoder runs {activation} with input_norm "
            f"{wanted[activation]!r} only; this SAE uses {input_norm!r}"
        )
    m = config["n_latents"]
    state: dict[str, Any] = {
        "pre_bias": ours["b_dec"],
        "encoder.weight": ours["W_enc"],
        "latent_bias": ours["b_enc"],
        "decoder.weight": ours["W_dec"].T,
        # Their buffers, at the values a fresh Autoencoder holds: load_state_dict wants them.
        "stats_last_nonzero": torch.zeros(m, dtype=torch.long),
        "latents_activation_frequency": torch.ones(m),
        "latents_mean_square": torch.zeros(m),
    }
    if activation == "topk":
        state["activation"] = "TopK"
        state["activation_state_dict"] = {"k": config["k"], "postact_fn": "ReLU"}
    else:
        state["activation"], state["activation_state_dict"] = "ReLU", {}
    path = Path(path)
    if not _is_file(path):
        path.mkdir(parents=True, exist_ok=True)
        path = path / SAVED_NAME
    layout.write_torch_file(path, state)


register(
    Format(
        "openai",
        detect,
        load,
        save,
        files=(SAVED_NAME,),
        saves_file=_is_file,
    )
)
