"""Test inputs and comparisons shared by the test files.

Two kinds of case:
- integer_case: small integers everywhere, so every pre-activation and gradient is exact in
  float32 and a fast path must match the float64 reference bit for bit; full of ties, rows
  with fewer than k positive pre-activations and all-negative rows.
- separated_case: continuous random data whose rows have no near-ties around the top k+1
  (nor near-zero pre-activations where zeros enter the top k), so float32 rounding cannot
  change which latents win and errors can be held to the 2x-PyTorch rule of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from sae_fast import backend_status, ops
from sae_fast import reference as ref

# Where the Triton backends' tests run: a GPU, else CPU tensors under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def runs_here(backend: str) -> pytest.MarkDecorator:
    """Skip a test module whose backend can run neither on a GPU nor on CPU tensors here."""
    reason = backend_status("cpu")[backend]
    return pytest.mark.skipif(
        reason is not None and not torch.cuda.is_available(),
        reason=f"{backend} backend cannot run here: {reason}",
    )


@dataclass
class Case:
    x: Tensor
    W_enc: Tensor
    b_enc: Tensor
    b_dec: Tensor
    W_dec: Tensor

    def to(self, dtype: torch.dtype, requires_grad: bool = False, device: str = "cpu") -> Case:
        def cast(t: Tensor) -> Tensor:
            return t.detach().to(device, dtype).requires_grad_(requires_grad)

        return Case(*(cast(t) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.x, self.W_enc, self.b_enc, self.b_dec, self.W_dec)


def integer_case(n: int, d: int, m: int, seed: int = 0) -> Case:
    """Exact-in-float32 case; rows 0 mod 5 are all-negative, rows 1 mod 5 have few positives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).double()
    W_enc = torch.randint(-1, 2, (m, d), generator=g).double()
    b_enc = torch.randint(-3, 1, (m,), generator=g).double()
    b_dec = torch.randint(-1, 2, (d,), generator=g).double()
    W_dec = torch.randint(-2, 3, (m, d), generator=g).double()
    x[0::5] = b_dec  # pre = b_enc <= 0 everywhere
    x[1::5] = b_dec
    x[1::5, 0] += 1  # pre = b_enc + W_enc[:, 0]: positive for few latents
    return Case(x, W_enc, b_enc, b_dec, W_dec)


def _separated(pre: Tensor, k: int, tol: float) -> Tensor:
    """Rows whose top k+1 pre-activations are tol apart and never within tol of zero."""
    top = pre.topk(min(k + 1, pre.shape[1]), dim=1).values
    gaps_ok = (top[:, :-1] - top[:, 1:] > tol).all(dim=1) | (top.shape[1] == 1)
    # If zeros enter the top k, any pre-activation near 0 could round to either side.
    zeros_enter = top[:, -1] <= tol
    near_zero = (pre.abs() <= tol).any(dim=1)
    return gaps_ok & (top.abs() > tol).all(dim=1) & ~(zeros_enter & near_zero)


def separated_case(n: int, d: int, m: int, k: int, seed: int = 0, tol: float = 1e-3) -> Case:
    """Continuous float64 case whose every row keeps its top-k set under float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5
    b_enc = 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    W_dec = torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5
    rows = []
    while sum(r.shape[0] for r in rows) < n:
        x = torch.randn(4 * n + 8, d, generator=g, dtype=torch.float64)
        rows.append(x[_separated(ref.pre_activation(x, W_enc, b_enc, b_dec), k, tol)])
    return Case(torch.cat(rows)[:n], W_enc, b_enc, b_dec, W_dec)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(ours: Tensor, plain: Tensor, oracle: Tensor, what: str) -> None:
    """2x PyTorch: |ours - oracle| <= 2 |plain - oracle| (+ a few ulps of scale), never NaN."""
    assert not torch.isnan(ours).any(), f"{what}: NaN"
    assert ours.shape == oracle.shape, f"{what}: shape {ours.shape} != {oracle.shape}"
    if not ours.numel():
        return
    scale = oracle.abs().max().item()
    floor = 16 * torch.finfo(ours.dtype).eps * max(scale, 1.0)
    err, plain_err = max_err(ours, oracle), max_err(plain, oracle)
    assert err <= 2 * plain_err + floor, (
        f"{what}: error {err:.3g} vs plain PyTorch {plain_err:.3g} (floor {floor:.3g})"
    )


def upstream_grads(
    n: int, d: int, k: int, integer: bool, device: torch.device, seed: int = 1
) -> tuple[Tensor, Tensor]:
    """Fixed upstream gradients for the code values (n, k) and x_hat (n, d)."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        grads = torch.randint(-2, 3, (n, k), generator=g), torch.randint(-2, 3, (n, d), generator=g)
    else:
        grads = torch.randn(n, k, generator=g), torch.randn(n, d, generator=g)
    return tuple(t.to(device) for t in grads)


def encode_decode_grads(
    encode, decode, case: Case, k: int, integer: bool = False
) -> dict[str, Tensor]:
    """Outputs and gradients of a fixed scalar loss through encode and decode.

    loss = <values, gv> + <x_hat, gx>, so both the code's and the reconstruction's gradient
    paths are exercised, and every parameter gets a gradient.
    """
    gv, gx = upstream_grads(*case.x.shape, k, integer, case.x.device)
    values, indices = encode(case.x, case.W_enc, case.b_enc, case.b_dec, k)
    x_hat = decode(values, indices, case.W_dec, case.b_dec)
    loss = (values * gv.to(values.dtype)).sum() + (x_hat * gx.to(x_hat.dtype)).sum()
    loss.backward()
    names = ("x", "W_enc", "b_enc", "b_dec", "W_dec")
    out = {"values": values.detach(), "indices": indices, "x_hat": x_hat.detach()}
    out.update({f"grad_{n}": t.grad for n, t in zip(names, case.tensors(), strict=True)})
    return out


def auxk_grads(encode_auxk, case: Case, k: int, dead: Tensor, k_aux: int) -> dict[str, Tensor]:
    """Both codes and the encoder gradients of a fixed loss on the code and the AuxK code."""
    n = case.x.shape[0]
    g = torch.Generator().manual_seed(2)
    gv = torch.randint(-2, 3, (n, k), generator=g).to(case.x.device)
    ga = torch.randint(-2, 3, (n, k_aux), generator=g).to(case.x.device)
    (values, indices), (aux_values, aux_indices) = encode_auxk(
        case.x, case.W_enc, case.b_enc, case.b_dec, k, dead.to(case.x.device), k_aux
    )
    ((values * gv).sum() + (aux_values * ga).sum()).backward()
    out = {"values": values, "indices": indices, "aux_values": aux_values}
    out["aux_indices"] = aux_indices
    names = ("x", "W_enc", "b_enc", "b_dec")
    out.update({f"grad_{n}": t.grad for n, t in zip(names, case.tensors()[:4], strict=True)})
    return {name: t.detach() for name, t in out.items()}


def reference_auxk(x, W_enc, b_enc, b_dec, k, dead, k_aux):
    """The oracle's (code, AuxK code) pair."""
    pre = ref.pre_activation(x, W_enc, b_enc, b_dec)
    return ref.topk(pre, k), ref.masked_topk(pre, dead, k_aux)


def assert_auxk_exact(
    case: Case, k: int, dead: Tensor, k_aux: int, device: str = "cpu", **options
) -> dict[str, Tensor]:
    """ops.encode_topk_auxk(..., **options) on an exact-in-float32 case, in float32 on device:
    both codes and every encoder gradient equal the float64 oracle's bit for bit. -> ours."""
    oracle = auxk_grads(reference_auxk, case.to(torch.float64, True), k, dead, k_aux)

    def ours(*args):
        return ops.encode_topk_auxk(*args, **options)

    got = auxk_grads(ours, case.to(torch.float32, True, device), k, dead, k_aux)
    for name, want in oracle.items():
        assert torch.equal(got[name].cpu().to(want.dtype), want), name
    return got
