"""Backend registry: which implementation of the sparse ops runs, and why another cannot.

Each backend says for a given device whether it can run, and if not, why. Selection order for
``backend=None``: the env var ``SAE_FAST_BACKEND``, else the first backend in priority order
that can run on the tensors' device. Asking for a backend that cannot run raises
:class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger("sae_fast")

ENV_VAR = "SAE_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One implementation of the sparse ops.

    why_not(device) returns None when the backend can run on that device, else the reason.
    encode_topk(x, W_enc, b_enc, b_dec, k, chunk_size) -> (values, indices);
    encode_topk_auxk(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> (values,
    indices, aux_values, aux_indices) from one encoder pass;
    decode(values, indices, W_dec, b_dec) -> x_hat. All are differentiable.
    """

    name: str
    priority: int
    why_not: Callable[[torch.device], str | None]
    encode_topk: Callable
    encode_topk_auxk: Callable
    decode: Callable
    # Device types it is picked for automatically (None: any it can run on). The Triton
    # interpreter can run on CPU tensors, but only when asked for by name.
    auto_device_types: tuple[str, ...] | None = None


_REGISTRY: dict[str, Backend] = {}
_logged: set[tuple[str, str]] = set()


def register(backend: Backend) -> None:
    """Add (or replace) a backend; higher priority wins in auto selection."""
    _REGISTRY[backend.name] = backend


def registered() -> list[str]:
    """Names of all registered backends, highest priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def status(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend: None if it can run on device, else the reason it cannot."""
    device = torch.device(device)
    return {name: _REGISTRY[name].why_not(device) for name in registered()}


def automatic(device: torch.device | str) -> list[str]:
    """Backends that auto selection may pick on device and that can run there, best first."""
    device = torch.device(device)
    return [
        name
        for name in registered()
        if _auto_for(_REGISTRY[name], device) and _REGISTRY[name].why_not(device) is None
    ]


def _auto_for(backend: Backend, device: torch.device) -> bool:
    return backend.auto_device_types is None or device.type in backend.auto_device_types


def resolve(requested: str | None, device: torch.device) -> Backend:
    """The backend to run on device: the one requested (or named by the env var), else auto."""
    source = "requested"
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], f"env {ENV_VAR}"
    if requested is None:
        names = automatic(device)
        if names:
            return _chosen(_REGISTRY[names[0]], device, "auto")
        raise BackendUnavailableError(f"no sae_fast backend can run on {device}: {status(device)}")
    if requested not in _REGISTRY:
        raise ValueError(
            f"backend must be one of {registered()} or None, got {requested!r} ({source})"
        )
    backend = _REGISTRY[requested]
    reason = backend.why_not(device)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {requested!r} ({source}) cannot run on {device}: {reason}"
        )
    return _chosen(backend, device, source)


def _chosen(backend: Backend, device: torch.device, how: str) -> Backend:
    key = (backend.name, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("sae_fast: backend %r runs on %s tensors (%s)", backend.name, device.type, how)
    return backend
