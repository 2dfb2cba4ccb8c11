"""The trainer's optimizer: Adam with the decoder's projection and renormalisation in its step.

`SaeAdam` is torch.optim.Adam (its param_groups, state and state_dict are Adam's, so
checkpoints read and write as before) whose step also does what a TopK SAE's trainer does
around Adam for W_dec (Gao et al. 2024): it removes from each row's gradient its component
along the row before the update (project) and rescales the rows to unit norm after it
(renormalise).

- On CUDA one Triton pass per parameter does all of it (kernels/adam_rows.py): 7 passes over
  W_dec's (m, d) tensors instead of about 16, the bytes of Adam alone.
- Elsewhere, or for a parameter whose kernel cannot be built (one warning), the same step by
  torch ops: the SAE's projection, torch's fused Adam, the SAE's renormalisation.

moments="bf16" stores both moments in bfloat16 (8 bytes per parameter less Adam state than
fp32; the arithmetic stays fp32, rounded once per step). The moments keep that dtype through a
checkpoint's save and load.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends.triton import DTYPES as KERNEL_DTYPES
from ..kernels.fallback import Fallback
from ..options import ADAM_MOMENTS
from ..sae import SparseAutoencoder
from .config import TrainConfig

_fallback = Fallback("optimizer")
# The torch step works through a parameter in blocks of rows of about this many bytes, so
# its fp32 temporaries stay small (a bf16 moment read as fp32 is a copy).
_BLOCK_BYTES = 4 << 20


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): warmup, flat, decay."""
    warmup = cfg.warmup_steps()
    if step < warmup:
        return (step + 1) / warmup
    start = int(cfg.lr_decay_start * cfg.steps)
    if cfg.lr_decay == "none" or step < start:
        return 1.0
    t = (step - start) / max(cfg.steps - start, 1)
    return 1.0 - t if cfg.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


def moment_dtype(moments: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype Adam's moments of a parameter of dtype are stored in (options.ADAM_MOMENTS)."""
    return torch.bfloat16 if moments == "bf16" else dtype


class SaeAdam(torch.optim.Adam):
    """Adam over sae's parameters; with project / renormalise, W_dec's rows as above."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        project: bool,
        renormalise: bool,
        moments: str = "param",
    ) -> None:
        if moments not in ADAM_MOMENTS:
            raise ValueError(f"moments must be one of {list(ADAM_MOMENTS)}, got {moments!r}")
        super().__init__(sae.parameters(), lr=lr, betas=betas, eps=eps, fused=True)
        # The step below skips itself on an inf/NaN gradient through GradScaler's check.
        self._step_supports_amp_scaling = False
        self.sae, self.project, self.renormalise = sae, project, renormalise
        self.moments = moments
        self.register_load_state_dict_post_hook(lambda opt: opt._store_moments())

    def _state(self, p: Tensor) -> dict:
        """p's state, made as torch's fused Adam makes it, the moments in their dtype."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=moment_dtype(self.moments, p.dtype))
        return state

    def _store_moments(self) -> None:
        """Moments in their dtype: Optimizer.load_state_dict casts them to the parameter's."""
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(moment_dtype(self.moments, p.dtype))

    @torch.no_grad()
    def step(self, closure=None) -> None:  # Adam's signature; no closure is used
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if all(p.is_cuda and p.dtype in KERNEL_DTYPES for p in params):
            for p in params:
                self._kernel_step(p)
            return
        if self.project:
            self.sae.remove_parallel_decoder_grad_()
        if self.moments == "param":
            super().step()
        else:
            for p in params:
                self._torch_step(p)
        if self.renormalise:
            self.sae.normalize_decoder_()

    def _hyper(self) -> dict:
        (group,) = self.param_groups
        beta1, beta2 = group["betas"]
        return {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"]}

    def _kernel_step(self, p: Tensor) -> None:
        from ..kernels.adam_rows import adam_rows

        state = self._state(p)
        state["step"] += 1
        rows = p is self.sae.W_dec
        project, renormalise = rows and self.project, rows and self.renormalise
        step = int(state["step"].item())
        m, v = state["exp_avg"], state["exp_avg_sq"]

        def torch_step() -> None:
            state["step"] -= 1  # _torch_step counts it again
            if project:
                self.sae.remove_parallel_decoder_grad_()
            self._torch_step(p)
            if renormalise:
                self.sae.normalize_decoder_()

        def kernel() -> None:
            adam_rows(
                p, p.grad.contiguous(), m, v, step=step, project=project,
                renormalise=renormalise, **self._hyper(),
            )  # fmt: skip

        _fallback((p.dtype, m.dtype, p.dim(), project, renormalise), kernel, torch_step)

    def _torch_step(self, p: Tensor) -> None:
        """One Adam step of p by torch ops in fp32, its moments stored in their dtype, a
        block of rows at a time."""
        state = self._state(p)
        state["step"] += 1
        h, step = self._hyper(), float(state["step"])
        step_size = h["lr"] / (1 - h["beta1"] ** step)
        bias2_sqrt = (1 - h["beta2"] ** step) ** 0.5
        rows = p.view(1, -1) if p.dim() == 1 else p.view(p.shape[0], -1)
        block = max(1, _BLOCK_BYTES // (4 * rows.shape[1]))
        tensors = (rows, p.grad.reshape(rows.shape), state["exp_avg"].view(rows.shape),
                   state["exp_avg_sq"].view(rows.shape))  # fmt: skip
        for start in range(0, rows.shape[0], block):
            p_b, g_b, m_b, v_b = (t[start : start + block] for t in tensors)
            g = g_b.float()
            m = m_b.float().mul_(h["beta1"]).add_(g, alpha=1 - h["beta1"])
            v = v_b.float().mul_(h["beta2"]).addcmul_(g, g, value=1 - h["beta2"])
            denom = v.sqrt().div_(bias2_sqrt).add_(h["eps"])
            p_b.copy_(p_b.float().addcdiv_(m, denom, value=-step_size))
            m_b.copy_(m)
            v_b.copy_(v)
