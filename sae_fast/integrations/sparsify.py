"""sparsify drop-in: a SparseCoder on sae_fast's sparse ops, and sparsify's Trainer building it.

``FastSparseCoder`` is sparsify's ``SparseCoder`` (same constructor, parameters, files and
``ForwardOutput``: fvu, AuxK and multi-TopK losses, transcoders, the skip connection) whose
encoder is sae_fast's fused TopK of ReLU: the (n, m) pre-activations are never written.

    from sae_fast.integrations.sparsify import use_in_trainer
    use_in_trainer()               # every Trainer built after this trains FastSparseCoders
    Trainer(cfg, dataset, model).fit()

What differs, and why:
- ``encode`` returns ``pre_acts=None`` (the dense pre-activations are what is never built), and
  the k latents of a row come in descending order (``torch.topk(sorted=False)`` leaves sparsify's
  order unspecified; the sets are the same where a row has k positive pre-activations).
- As in sparsify, the AuxK and multi-TopK losses train the decoder only: sparsify's encoder
  backward drops their gradient, and so does this one, so both train the same weights.
- Where a row has fewer than k positive pre-activations, sparsify fills its k with zeros picked
  among ties and passes them gradient as if ReLU were linear there; here the zeros sit at the
  lowest unused latents and carry no gradient, the derivative of ReLU at a non-positive input.
  The outputs are the same; the encoder's gradient on such rows and which zero latents the
  Trainer counts as fired differ.
- ``activation="groupmax"`` runs sparsify's own code.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from sparsify import SparseCoder
from sparsify import trainer as sparsify_trainer
from sparsify.fused_encoder import EncoderOutput
from sparsify.sparse_coder import ForwardOutput
from torch import Tensor

from .. import ops
from ..ops import SparseCode
from ..sae import autocast_inputs

_MULTI_TOPK = 4  # sparsify's multi-TopK loss decodes the top 4k latents


class FastSparseCoder(SparseCoder):
    """sparsify's SparseCoder (same constructor and state) on sae_fast's encoder and decoder."""

    def _encode(
        self, x: Tensor, width: int, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> list[SparseCode]:
        """x (n, d_in) -> [TopK code (n, width)] and, with a dead_mask, the AuxK code (n, k_aux)."""
        # As sparsify: b_dec subtracted before any cast (x - b_dec promotes to the coder's
        # dtype), and the encoder in the autocast dtype where autocast is on.
        if not self.cfg.transcode:
            x = x - self.b_dec
        W, b = self.encoder.weight, self.encoder.bias
        x, W, b = autocast_inputs(x.to(W.dtype), W, b)
        zeros = x.new_zeros(x.shape[-1])
        if dead_mask is None:
            return [ops.encode_topk(x, W, b, zeros, width)]
        return list(ops.encode_topk_auxk(x, W, b, zeros, width, dead_mask, k_aux))

    def encode(self, x: Tensor) -> EncoderOutput:
        """x (..., d_in) -> EncoderOutput(top_acts (..., k), top_indices (..., k),
        pre_acts=None)."""
        if self.cfg.activation != "topk":
            return super().encode(x)
        lead = x.shape[:-1]
        values, indices = self._encode(x.reshape(-1, x.shape[-1]), self.cfg.k)[0]
        return EncoderOutput(values.reshape(*lead, -1), indices.reshape(*lead, -1), None)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """top_acts, top_indices (n, k) -> (n, d_out): the decoder rows' sum plus b_dec."""
        return self._gather(top_acts, top_indices, self.b_dec)

    def _gather(self, values: Tensor, indices: Tensor, bias: Tensor) -> Tensor:
        assert self.W_dec is not None, "Decoder weight was not initialized."
        return ops.decode(values.to(self.dtype), indices, self.W_dec, bias)

    # sparsify runs its forward under bf16 autocast on GPUs that have it; so does this one.
    @torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | None = None,
    ) -> ForwardOutput:
        """sparsify's forward: x (n, d_in), y (n, d_out) the target (x when None) ->
        ForwardOutput(sae_out, latent_acts, latent_indices, fvu, auxk_loss, multi_topk_fvu)."""
        if self.cfg.activation != "topk":
            return super().forward(x, y, dead_mask=dead_mask, total_variance=total_variance)
        y = x if y is None else y
        k = self.cfg.k
        width = _MULTI_TOPK * k if self.cfg.multi_topk else k
        num_dead = 0 if dead_mask is None else int(dead_mask.sum())
        k_aux = min(y.shape[-1] // 2, num_dead)
        width = min(width, self.num_latents)
        codes = self._encode(x, width, dead_mask if num_dead else None, k_aux)
        wide = codes[0]
        top_acts, top_indices = wide.values[:, :k], wide.indices[:, :k]

        sae_out = self.decode(top_acts, top_indices)
        if self.W_skip is not None:
            sae_out += x.to(self.dtype) @ self.W_skip.mT
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()

        if num_dead:
            scale = min(num_dead / (y.shape[-1] // 2), 1.0)
            aux = codes[1]
            # sparsify's encoder backward drops this loss's gradient: the decoder alone learns.
            no_bias = torch.zeros_like(self.b_dec)
            e_hat = self._gather(aux.values.detach(), aux.indices, no_bias)
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)
        fvu = e.pow(2).sum() / total_variance

        if self.cfg.multi_topk:
            top_acts, top_indices = wide.values.detach(), wide.indices  # decoder-only, as above
            sae_out = self.decode(top_acts, top_indices)
            multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
        else:
            multi_topk_fvu = sae_out.new_tensor(0.0)
        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)

    # sparsify's loaders build its own class; these return the same coders, fast.
    @staticmethod
    def load_from_disk(*args: Any, **kwargs: Any) -> FastSparseCoder:
        """sparsify's SparseCoder.load_from_disk (cfg.json, sae.safetensors), fast."""
        return fast(SparseCoder.load_from_disk(*args, **kwargs))

    @staticmethod
    def load_from_hub(*args: Any, **kwargs: Any) -> FastSparseCoder:
        """sparsify's SparseCoder.load_from_hub, fast."""
        return fast(SparseCoder.load_from_hub(*args, **kwargs))

    @staticmethod
    def load_many(*args: Any, **kwargs: Any) -> dict[str, FastSparseCoder]:
        """sparsify's SparseCoder.load_many, each coder fast."""
        return {name: fast(c) for name, c in SparseCoder.load_many(*args, **kwargs).items()}


def fast(coder: SparseCoder) -> FastSparseCoder:
    """The same SparseCoder (config, weights, device, dtype) as a FastSparseCoder."""
    if isinstance(coder, FastSparseCoder):
        return coder
    if not isinstance(coder, SparseCoder):
        raise TypeError(f"coder must be a sparsify SparseCoder, got {type(coder).__name__}")
    d_in = coder.encoder.weight.shape[1]
    ours = FastSparseCoder(
        d_in, coder.cfg, coder.device, coder.dtype, decoder=coder.W_dec is not None
    )
    ours.load_state_dict(coder.state_dict())
    return ours


class use_in_trainer(AbstractContextManager):  # noqa: N801 (used as a function)
    """Make sparsify's Trainer build FastSparseCoders: for good when called, until the end of
    the block when used as ``with use_in_trainer():``."""

    def __init__(self) -> None:
        self.previous = sparsify_trainer.SparseCoder
        sparsify_trainer.SparseCoder = FastSparseCoder

    def __exit__(self, *exc: object) -> None:
        sparsify_trainer.SparseCoder = self.previous
