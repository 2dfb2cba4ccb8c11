"""Checks shared by the tests of other libraries' checkpoint formats.

Each format test writes the library's layout from random tensors, re-implements the library's
forward in float64 from its source (the oracle), and asks assert_same_function whether the
loaded SparseAutoencoder computes it. write_code_executing_pickle makes the file that proves a
loader never unpickles code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sae_fast import SparseAutoencoder, SparseCode
from sae_fast import reference as ref

Forward = Callable[[Tensor], tuple[Tensor, Tensor]]  # x (n, d) -> x_hat (n, d), latents (n, m)


def assert_same_function(
    sae: SparseAutoencoder, their_forward: Forward, x: Tensor, tol: float | None = None
) -> Tensor:
    """sae's latents, x_hat and d MSE(x_hat, x) / dx equal their_forward's; returns its latents.

    The oracle runs in float64 on x; sae runs in its own dtype. tol: atol = rtol for sae
    dtypes other than float64 (float64 uses torch's defaults).
    """
    x_ours = x.detach().to(sae.W_enc.dtype).requires_grad_(True)
    x_theirs = x.detach().double().requires_grad_(True)
    out = sae(x_ours)
    z = out.code.to_dense(sae.n_latents) if isinstance(out.code, SparseCode) else out.code
    x_hat, latents = their_forward(x_theirs)
    close = {} if tol is None else {"atol": tol, "rtol": tol}
    torch.testing.assert_close(z.double(), latents, **close, msg="latents")
    torch.testing.assert_close(out.x_hat.double(), x_hat, **close, msg="x_hat")
    (g_ours,) = torch.autograd.grad(ref.mse(x_ours, out.x_hat), x_ours)
    (g_theirs,) = torch.autograd.grad(ref.mse(x_theirs, x_hat), x_theirs)
    torch.testing.assert_close(g_ours.double(), g_theirs, **close, msg="grad x")
    return latents.detach()


class _Payload:
    """Unpickling this calls os.mkdir(marker): code execution, observable and harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def write_code_executing_pickle(path: Path, marker: Path) -> None:
    """A torch.save file at path that creates folder marker when unpickled unsafely."""
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": _Payload(marker)}, path)
