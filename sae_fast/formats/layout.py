"""Helpers the foreign formats share: safe reading, shape checks, folding into our layout.

Every foreign checkpoint ends up as the same thing: tensors in our layout (W_enc, W_dec (m, d),
one row per latent; b_enc (m,); b_dec (d,); the activation's extras) handed to assemble(),
which makes the SAE config that describes them (sae_fast.sae_config) and turns every
inconsistency into a CheckpointError.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import sae_config
from ..checkpoint import CheckpointError
from ..files import atomic_path, save_torch
from ..validation import check_int, dtype_name
from .registry import Config, Tensors


def _load(path: Path, mmap: bool) -> Any:
    # weights_only=True: the unpickler accepts tensors and plain containers only, so a
    # checkpoint can never import or call anything. Never relax this.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's message naming what the weights-only unpickler refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = [line for line in lines if not line.startswith(boilerplate)]
    return (detail or lines or ["no detail"])[0]


def read_torch_file(path: Path) -> dict[str, Any]:
    """The dict that torch.save wrote at path, read with weights_only=True.

    A pickle that would import or call anything (code execution) is refused, as are files that
    are not torch files or hold something other than a dict: CheckpointError says which.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    try:
        body = _load(path, mmap=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain containers, "
            f"which could run code when unpickled ({_refusal(e)})"
        ) from e
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... on damage
        raise CheckpointError(
            f"{path} is not a readable torch file ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(body, dict):
        raise CheckpointError(f"{path} holds a {type(body).__name__}, not a state dict")
    return body


def peek_keys(path: Path) -> set[str] | None:
    """The top-level keys of the dict in the torch file at path; None if it cannot be read.

    Memory-maps the tensors where the file allows (zip format), so detecting a format does not
    read the weights; same weights_only safety as read_torch_file.
    """
    for mmap in (True, False):
        try:
            body = _load(path, mmap=mmap)
        except RuntimeError:
            continue  # legacy (non-zip) files cannot be memory-mapped
        except Exception:
            return None
        return {str(k) for k in body} if isinstance(body, dict) else None
    return None


def get_tensor(where: str, state: dict[str, Any], key: str, shape: tuple[int, ...]) -> Tensor:
    """state[key], which must be a tensor of shape; CheckpointError naming where otherwise."""
    if key not in state:
        raise CheckpointError(f"{where}: missing tensor {key!r} (found {sorted(state)})")
    value = state[key]
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        raise CheckpointError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {shape}")
    return value


def get_int(where: str, name: str, value: Any) -> int:
    """An integer hyperparameter stored as an int or a one-element integer tensor."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    return check_int(value, f"{where}: {name}", minimum=None, error=CheckpointError)


def shift_encoder_bias(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, sign: int) -> Tensor:
    """b_enc + sign * W_enc @ b_dec, in float64, returned in b_enc's dtype.  W_enc (m, d).

    An encoder that does not subtract b_dec, pre = x @ W_enc.T + b, equals ours, (x - b_dec)
    @ W_enc.T + b_enc, with b_enc = b + W_enc @ b_dec (sign=+1); sign=-1 undoes it on save.
    float64 keeps the fold's rounding below that of the forward pass itself.
    """
    shifted = b_enc.double() + sign * (W_enc.double() @ b_dec.double())
    return shifted.to(b_enc.dtype)


def assemble(
    where: str,
    tensors: Tensors,
    *,
    activation: str,
    k: int | None = None,
    input_norm: str = "none",
    jumprelu_bandwidth: float = 1e-3,
    matryoshka: list[int] | None = None,
    transcoder: bool = False,
    skip_connection: bool = False,
    provenance: dict | None = None,
) -> tuple[Config, Tensors]:
    """The SAE config that describes tensors, given in our layout and names, and the tensors.

    tensors: W_enc (m, d), W_dec (m, d_out), b_enc (m,), b_dec (d_out,) (d_out: d but for a
    transcoder's, read from W_dec), W_skip (d_out, d) with a skip connection, and the
    activation's extras (log_threshold; r_mag, b_mag; threshold); provenance what the file
    records of the
    training (sae_config.PROVENANCE_KEYS). All are cast to W_enc's dtype, which must be
    floating point; sizes come from W_enc, and any disagreement raises CheckpointError.
    """
    W_enc = tensors["W_enc"]
    if not W_enc.is_floating_point():
        raise CheckpointError(f"{where}: the encoder weight is {W_enc.dtype}, not floating point")
    m, d = W_enc.shape
    config = {
        "d_in": d,
        "n_latents": m,
        "k": k,
        "activation": activation,
        "dtype": dtype_name(W_enc.dtype),
        "jumprelu_bandwidth": jumprelu_bandwidth,
        "input_norm": input_norm,
        "matryoshka": matryoshka,
        "transcoder": transcoder,
        "d_out": tensors["W_dec"].shape[-1] if transcoder else None,
        "skip_connection": skip_connection,
        "provenance": provenance or {},
    }
    try:
        config = sae_config.complete(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} does not describe an SAE sae_fast runs: {e}") from e
    expected = sae_config.tensor_shapes(config)
    if set(expected) != set(tensors):  # a bug in a format module, not in the file
        raise AssertionError(f"tensors {sorted(tensors)} != {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{where}: {name} would be {tuple(tensors[name].shape)} but the encoder weight "
                f"implies {shape}"
            )
    state = {n: t.detach().to(W_enc.dtype).contiguous().clone() for n, t in tensors.items()}
    return config, state


def write_torch_file(path: Path, body: dict[str, Any]) -> None:
    """torch.save body (tensors contiguous) at path, atomically (see files.atomic_path)."""
    body = {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in body.items()}
    with atomic_path(path) as tmp:
        save_torch(body, tmp)
