"""Backends of the sparse ops: the registry, the shared pair-sparse scaffold, one module each.

- registry: Backend (what a backend computes: device types, dtypes, requirements), selection
  from the inputs, SAE_FAST_BACKEND, the reasons a backend cannot run;
- pairs: the sparse helpers (gather_sum, scatter_sum, pair_dot) and the encoder's autograd
  scaffold, shared by every backend and by the Triton kernels;
- encoders: which exact GPU encoder the triton backend runs, fused or chunked, by measurement;
- torch, triton, chunked, cuda: one backend each; importing this package registers all four.
"""

from . import chunked, cuda, torch, triton  # noqa: F401 (each registers its backend)
from .registry import (
    ENV_VAR,
    Backend,
    BackendUnavailableError,
    automatic,
    get,
    register,
    registered,
    resolve,
    status,
    unregister,
)

__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendUnavailableError",
    "automatic",
    "get",
    "register",
    "registered",
    "resolve",
    "status",
    "unregister",
]
