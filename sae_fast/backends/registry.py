"""Backend registry: which implementation of the sparse ops runs on given tensors, and why
another cannot.

Each backend declares what it computes: the device types and dtypes, and a requirement that
may be missing (an import, a built extension, an interpreter switch). Selection for
``backend=None``: the env var ``SAE_FAST_BACKEND``, else the highest-priority backend that auto
selection may pick for the tensors' device type and that can run on their device and dtype
(float64 CUDA tensors go to the ``torch`` backend, which computes them). Asking for a backend
that cannot run raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..validation import dtype_name
from .pairs import code_function, encoder_backward

logger = logging.getLogger("sae_fast")

ENV_VAR = "SAE_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here; the message says why."""


def _nothing_missing(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of the sparse ops, and what it computes.

    encoder_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> (values,
    indices) of the TopK code, and with a dead_mask (m,) also (aux_values, aux_indices) of the
    AuxK code from the same pass; encoder_backward has pairs.encoder_backward's contract.
    encode is the differentiable encoder built from the two (same arguments); decode(values,
    indices, W_dec, b_dec) -> x_hat is differentiable.
    device_types / dtypes: what it computes (None: any device type / floating dtype);
    auto_device_types: where auto selection may pick it (None: wherever it runs);
    requirement(device): None, or what it lacks to run on that device.
    """

    name: str
    priority: int
    encoder_forward: Callable[..., tuple[Tensor, ...]]
    decode: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    encoder_backward: Callable[..., tuple[Tensor | None, ...]] = encoder_backward
    device_types: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    auto_device_types: tuple[str, ...] | None = None
    requirement: Callable[[torch.device], str | None] = _nothing_missing
    encode: Callable[..., tuple[Tensor, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        function = code_function(f"{self.name}_encode", self.encoder_forward, self.encoder_backward)
        object.__setattr__(self, "encode", function.apply)

    def why_not_on(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this backend computes dtype tensors on device, else why not."""
        missing = self.requirement(device)
        if missing is not None:
            return missing
        if self.device_types is not None and device.type not in self.device_types:
            where = " or ".join(self.device_types)
            return f"the {self.name} backend runs on {where} tensors, not {device.type}"
        if self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(map(dtype_name, self.dtypes))
            return f"the {self.name} backend computes {names}, not {dtype_name(dtype)}"
        return None

    def why_not(self, *tensors: Tensor) -> str | None:
        """None if this backend can run on these tensors (their devices and dtypes)."""
        for t in tensors:
            reason = self.why_not_on(t.device, t.dtype)
            if reason is not None:
                return reason
        return None

    def auto_for(self, device: torch.device) -> bool:
        """Whether auto selection may pick this backend for tensors on device."""
        return self.auto_device_types is None or device.type in self.auto_device_types


_REGISTRY: dict[str, Backend] = {}
_logged: set[tuple[str, str, torch.dtype]] = set()


def register(backend: Backend) -> None:
    """Add (or replace) a backend; higher priority wins in auto selection."""
    _REGISTRY[backend.name] = backend


def unregister(name: str) -> None:
    """Remove the backend called name."""
    del _REGISTRY[name]


def registered() -> list[str]:
    """Names of all registered backends, highest priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get(name: str) -> Backend:
    """The backend called name; ValueError listing the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {registered()} or None, got {name!r}")
    return _REGISTRY[name]


def status(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, str | None]:
    """For each backend: None if it can run on dtype tensors on device, else the reason."""
    device = torch.device(device)
    return {name: _REGISTRY[name].why_not_on(device, dtype) for name in registered()}


def automatic(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that auto selection may pick for dtype tensors on device, best first."""
    device = torch.device(device)
    return [
        name
        for name in registered()
        if _REGISTRY[name].auto_for(device) and _REGISTRY[name].why_not_on(device, dtype) is None
    ]


def resolve(requested: str | None, *tensors: Tensor) -> Backend:
    """The backend to run on tensors: the one requested (or named by the env var), else auto.

    tensors: the floating inputs of an op, which share one device and dtype.
    """
    device, dtype = tensors[0].device, tensors[0].dtype
    source = "requested"
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], f"env {ENV_VAR}"
    if requested is None:
        names = automatic(device, dtype)
        if names:
            return _chosen(_REGISTRY[names[0]], device, dtype, "auto")
        raise BackendUnavailableError(
            f"no sae_fast backend can run on {device} {dtype_name(dtype)} tensors: "
            f"{status(device, dtype)}"
        )
    try:
        backend = get(requested)
    except ValueError as e:
        raise ValueError(f"{e} ({source})") from None
    reason = backend.why_not(*tensors)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {requested!r} ({source}) cannot run on {device}: {reason}"
        )
    return _chosen(backend, device, dtype, source)


def _chosen(backend: Backend, device: torch.device, dtype: torch.dtype, how: str) -> Backend:
    key = (backend.name, device.type, dtype)
    if key not in _logged:
        _logged.add(key)
        logger.info(
            "sae_fast: backend %r runs on %s %s tensors (%s)",
            backend.name,
            device.type,
            dtype_name(dtype),
            how,
        )
    return backend
