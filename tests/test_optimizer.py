"""The trainer's optimizer step: SaeAdam and its Triton kernel against the step it replaces.

Today's step (before SaeAdam) was: remove each decoder row's parallel gradient, torch's fused
Adam, renormalise the decoder rows. The Triton kernel (kernels/adam_rows.py, on CPU under
TRITON_INTERPRET=1) must give that step's parameters and moments within twice PyTorch's own
error against the same step in float64; SaeAdam's torch path must give it bit for bit; bf16
moments must stay bf16 through a checkpoint and match the kernel's.
"""

from __future__ import annotations

import pytest
import torch
from cases import DEVICE, assert_within_torch_error, runs_here

from sae_fast import SparseAutoencoder
from sae_fast.training.optimizer import SaeAdam

HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 6.25e-10}
STEPS = 3


def sae_with_grads(dtype: torch.dtype, device: str = "cpu", d: int = 40, m: int = 5):
    """A small SAE whose W_dec has a zero row, and STEPS sets of gradients for its parameters
    (d = 40: several trips of the interpreter's 16-column tiles, the last one partial)."""
    sae = SparseAutoencoder(d, m, k=2, dtype=torch.float64)
    sae.seed_parameters_(0)
    with torch.no_grad():
        sae.W_dec[1] = 0
    g = torch.Generator().manual_seed(1)
    grads = [
        {name: torch.randn(p.shape, generator=g, dtype=torch.float64) for name, p in
         sae.named_parameters()}
        for _ in range(STEPS)
    ]  # fmt: skip
    return sae.to(device, dtype), [{n: t.to(device, dtype) for n, t in s.items()} for s in grads]


def todays_step(sae, grads, project=True, renormalise=True):
    """The trainer's step before SaeAdam, STEPS times: parameters and moments after it."""
    optimizer = torch.optim.Adam(sae.parameters(), **HYPER, fused=True)
    for step in grads:
        for name, p in sae.named_parameters():
            p.grad = step[name].clone()
        if project:
            sae.remove_parallel_decoder_grad_()
        optimizer.step()
        if renormalise:
            sae.normalize_decoder_()
    return _result(sae, optimizer)


def _result(sae, optimizer):
    out = {}
    for name, p in sae.named_parameters():
        out[name] = p.detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = optimizer.state[p][key].clone()
    return out


def kernel_step(sae, grads, moments=None, project=True, renormalise=True):
    """STEPS steps of the Triton kernel over each parameter (W_dec with the row handling)."""
    from sae_fast.kernels.adam_rows import adam_rows

    beta1, beta2 = HYPER["betas"]
    state = {
        name: [torch.zeros_like(p, dtype=moments or p.dtype) for _ in range(2)]
        for name, p in sae.named_parameters()
    }
    out = {}
    with torch.no_grad():
        for number, step in enumerate(grads, 1):
            for name, p in sae.named_parameters():
                rows = name == "W_dec"
                adam_rows(
                    p.data, step[name], *state[name], lr=HYPER["lr"], beta1=beta1, beta2=beta2,
                    eps=HYPER["eps"], step=number, project=rows and project,
                    renormalise=rows and renormalise,
                )  # fmt: skip
    for name, p in sae.named_parameters():
        out[name] = p.detach().clone()
        out[f"{name}.exp_avg"], out[f"{name}.exp_avg_sq"] = state[name]
    return out


@runs_here("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("project", "renormalise"), [(True, True), (False, False)])
def test_kernel_matches_todays_step(dtype, project, renormalise):
    oracle = todays_step(*sae_with_grads(torch.float64), project, renormalise)
    plain = todays_step(*sae_with_grads(dtype), project, renormalise)
    ours = kernel_step(*sae_with_grads(dtype, DEVICE), None, project, renormalise)
    for name, want in oracle.items():
        assert ours[name].dtype == dtype, name
        assert_within_torch_error(ours[name].cpu(), plain[name], want, name)
    if renormalise:
        norms = ours["W_dec"].double().norm(dim=1).cpu()  # the zero row too, after Adam moved it
        torch.testing.assert_close(norms, torch.ones_like(norms),
                                   atol=4 * torch.finfo(dtype).eps, rtol=0)  # fmt: skip


def saeadam_step(sae, grads, moments="param", project=True, renormalise=True):
    optimizer = SaeAdam(sae, **HYPER, project=project, renormalise=renormalise, moments=moments)
    for step in grads:
        for name, p in sae.named_parameters():
            p.grad = step[name].clone()
        optimizer.step()
    return optimizer, _result(sae, optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saeadam_is_todays_step_on_cpu(dtype):
    want = todays_step(*sae_with_grads(dtype))
    _, got = saeadam_step(*sae_with_grads(dtype))
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@runs_here("triton")
def test_bf16_moments_kernel_matches_torch_path():
    """The kernel's fp32 step with moments stored in bf16 against SaeAdam's torch path.

    The interpreter casts fp32 to bf16 by truncation where the GPU and torch round to nearest,
    so a stored moment may move one bf16 step (at most 2^-7 of its size) further each step,
    and each step's update, which is about lr * m / sqrt(v), by up to lr * 2^-7."""
    _, torch_path = saeadam_step(*sae_with_grads(torch.float32), moments="bf16")
    ours = kernel_step(*sae_with_grads(torch.float32, DEVICE), torch.bfloat16)
    for name, want in torch_path.items():
        assert ours[name].dtype == want.dtype, name
        moment = "." in name
        atol = STEPS * (2**-7 * want.abs().max().item() if moment else 2**-7 * HYPER["lr"])
        torch.testing.assert_close(ours[name].cpu(), want, rtol=0, atol=atol, msg=name)


def test_bf16_moments_stay_bf16_through_a_checkpoint():
    sae, grads = sae_with_grads(torch.float32)
    optimizer, _ = saeadam_step(sae, grads, moments="bf16")
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.bfloat16}
    saved = optimizer.state_dict()
    again = SaeAdam(sae, **HYPER, project=True, renormalise=True, moments="bf16")
    again.load_state_dict(saved)  # Optimizer.load_state_dict casts moments to fp32 ...
    for p, state in again.state.items():  # ... and SaeAdam keeps them bf16, exactly
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.bfloat16
            assert torch.equal(state[key], optimizer.state[p][key])


def test_bf16_moments_follow_fp32_moments():
    """Over a few steps bf16 moments move the parameters as fp32 moments do, up to bf16's
    rounding of the moments."""
    _, fp32 = saeadam_step(*sae_with_grads(torch.float32))
    _, bf16 = saeadam_step(*sae_with_grads(torch.float32), moments="bf16")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(bf16[name], fp32[name], rtol=0, atol=HYPER["lr"] * 2**-7)
        assert not torch.equal(bf16[f"{name}.exp_avg"].float(), fp32[f"{name}.exp_avg"])


def test_bad_moments_named():
    sae, _ = sae_with_grads(torch.float32)
    with pytest.raises(ValueError, match="moments must be one of"):
        SaeAdam(sae, **HYPER, project=True, renormalise=True, moments="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("moments", ["param", "bf16"])
def test_saeadam_on_cuda_runs_the_kernel_and_matches_its_torch_step(moments, recwarn):
    """On a GPU SaeAdam's step is the Triton pass (no fallback warning); it gives the torch
    step's parameters within float tolerance (fp32 parameters, 3 steps)."""
    _, on_cpu = saeadam_step(*sae_with_grads(torch.float32), moments=moments)
    _, on_gpu = saeadam_step(*sae_with_grads(torch.float32, "cuda"), moments=moments)
    assert not [w for w in recwarn if "optimizer kernel" in str(w.message)]
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-5, atol=1e-6)
