"""SAELens drop-in: SAELens's TopK, BatchTopK and Matryoshka BatchTopK on sae_fast's sparse ops.

Importing this module registers, through SAELens's own registry, the architectures

    sae_fast_topk                  TopK (inference and training)
    sae_fast_batchtopk             BatchTopK (training; saved as SAELens saves it: jumprelu)
    sae_fast_matryoshka_batchtopk  Matryoshka BatchTopK (training; saved as jumprelu)

whose config classes take SAELens's fields. Put a config in a runner config
(``LanguageModelSAERunnerConfig(sae=FastTopKTrainingSAEConfig(...))``) and SAELens's own runner
trains on the fused encoder (TopK of ReLU without the (n, m) pre-activations), the sparse
decoder and the sparse backward. The classes subclass SAELens's, so the maths is SAELens's:
``rescale_acts_by_decoder_norm`` multiplies latent j's pre-activation by ||W_dec[j]|| and divides
its activation by it before the decode; the AuxK loss is SAELens's (the top d_in/2 pre-activations
of the dead latents, negative ones included, reconstructing the detached residual).

What a training step builds: the (n, k) code, the (n, d) reconstruction, and for the trainer's
firing counts a sparse COO ``feature_acts`` (n, m) holding the firing latents only. Two things
are not dense-free: ``hidden_pre`` is None (SAELens's trainer never reads it; it is the dense
(n, m) pre-activation by definition), and with dead latents the AuxK loss multiplies the batch by
the dead latents' encoder columns, (n, n_dead) (its cost: n_dead / m of the encoder GEMM).

Where the dense activations are asked for, SAELens's own code runs: a hook on
``hook_sae_acts_pre`` or ``hook_sae_acts_post`` (``run_with_cache`` of HookedSAETransformer),
``forward`` with ``use_error_term`` (it reruns the SAE with the hooks off),
``reshape_activations="hook_z"``, the layer-norm and constant-norm normalisations (which SAELens's
AuxK refuses), and Matryoshka's ``use_matryoshka_aux_loss``. ``encode`` returns the dense
(..., d_sae) activations, as SAELens's does; ``forward`` decodes from the sparse code. Under
``torch.autocast`` the sparse ops take the autocast dtype, as SAELens's matmuls do.

After training the runner saves an inference SAE that SAELens alone loads: ``topk`` for
sae_fast_topk (its decoder norms folded, as SAELens folds them) and ``jumprelu`` for the
BatchTopK ones. ``fast(sae)`` gives any SAELens TopK or BatchTopK SAE (e.g. one from
``SAE.from_pretrained``) the fast path, with the same weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import torch
from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAE, SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from torch import Tensor

from .. import ops
from ..ops import SparseCode
from ..sae import autocast_inputs

# The normalisations SAELens's AuxK refuses; their SAEs run SAELens's own code.
_DENSE_NORMS = ("constant_norm_rescale", "layer_norm")


class _FastPath:
    """The sparse forward shared by the inference and training classes (a mixin over SAELens's
    TopK classes: cfg, W_enc (d, m), b_enc, W_dec (m, d), b_dec and the hook points)."""

    def _fast(self) -> bool:
        """Whether the sparse path computes what SAELens's code would: no hook wants the dense
        activations, and no reshape or normalisation needs SAELens's own code."""
        # Any hook, TransformerLens's add_hook or torch's own register_*_hook, lands in the
        # module's hook dicts (SAELens's SparseHookPoint reads the same ones).
        hooked = any(
            point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
            for point in (self.hook_sae_acts_pre, self.hook_sae_acts_post)
        )
        cfg = self.cfg
        return not (
            hooked or cfg.reshape_activations != "none" or cfg.normalize_activations in _DENSE_NORMS
        )

    def _norms(self) -> Tensor | None:
        """(m,) the decoder row norms the activations are rescaled by, or None."""
        return self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def _encoder(self, norms: Tensor | None) -> tuple[Tensor, Tensor]:
        """(W_enc (m, d), b_enc (m,)) in sae_fast's layout, row-major (the encoder reads and
        gathers rows; SAELens's W_enc is (d, m)); with norms, rescaled:
        (x @ W + b) * n = x @ (W * n) + b * n."""
        W_enc = self.W_enc.T.contiguous()
        if norms is None:
            return W_enc, self.b_enc
        return W_enc * norms[:, None], self.b_enc * norms

    def _topk(self, sae_in: Tensor, k: int, norms: Tensor | None) -> SparseCode:
        """sae_in (n, d), already through process_sae_in -> TopK code (n, k) of the (rescaled)
        ReLU pre-activations."""
        W_enc, b_enc = self._encoder(norms)
        zeros = sae_in.new_zeros(sae_in.shape[-1])
        return ops.encode_topk(*autocast_inputs(sae_in, W_enc, b_enc, zeros), k)

    def _code(self, sae_in: Tensor, norms: Tensor | None) -> SparseCode:
        """The architecture's code of sae_in (n, d): TopK here."""
        return self._topk(sae_in, self.cfg.k, norms)

    def _gather(self, code: SparseCode, norms: Tensor | None, bias: Tensor) -> Tensor:
        """sum_j values[:, j] / n[idx] * W_dec[idx] + bias: (n, d) from code (n, w)."""
        values = code.values if norms is None else code.values * (1 / norms)[code.indices]
        values, W_dec = autocast_inputs(values, self.W_dec)
        # The bias is added after, in its own dtype, as SAELens's acts @ W_dec + b_dec does.
        rows = ops.decode(values, code.indices, W_dec, W_dec.new_zeros(W_dec.shape[1]))
        return rows + bias

    def _decode_code(self, code: SparseCode, norms: Tensor | None) -> Tensor:
        """SparseCode (n, w) -> SAELens's decode output (n, d): the gather-sum of the decoder
        rows, b_dec, hook_sae_recons and the output normalisation."""
        x_hat = self.hook_sae_recons(self._gather(code, norms, self.b_dec))
        return self.run_time_activation_norm_fn_out(x_hat)

    def _sparse_code(self, x: Tensor) -> tuple[Tensor, SparseCode, Tensor | None]:
        """x (..., d) -> (sae_in (n, d) through process_sae_in, code (n, w), norms) over the
        flattened rows."""
        sae_in = self.process_sae_in(x).reshape(-1, self.cfg.d_in)
        norms = self._norms()
        return sae_in, self._code(sae_in, norms), norms

    def _sparse_forward(self, x: Tensor) -> tuple[Tensor, SparseCode, Tensor, Tensor | None]:
        """x (..., d) -> (sae_in (n, d), code (n, w), sae_out (n, d), norms) (_sparse_code)."""
        sae_in, code, norms = self._sparse_code(x)
        return sae_in, code, self._decode_code(code, norms), norms

    def encode(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> dense feature activations (..., d_sae), as SAELens's encode."""
        if not self._fast():
            return super().encode(x)
        lead = x.shape[:-1]
        code = self._sparse_code(x)[1]
        if getattr(self.cfg, "use_sparse_activations", False) and x.dim() == 2:
            return self.hook_sae_acts_post(sparse_feature_acts(code, self.cfg.d_sae))
        dense = code.to_dense(self.cfg.d_sae).reshape(*lead, self.cfg.d_sae)
        return self.hook_sae_acts_post(dense)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> the reconstruction (..., d_in), decoded from the sparse code."""
        if self.use_error_term or not self._fast():
            return super().forward(x)
        sae_out = self._sparse_forward(x)[2]
        return self.hook_sae_output(sae_out.reshape(x.shape))


def sparse_feature_acts(code: SparseCode, d_sae: int) -> Tensor:
    """The firing entries of code (n, w) as a sparse COO tensor (n, d_sae): what SAELens's
    trainer counts (nonzero means fired), without a dense (n, d_sae) tensor."""
    n, width = code.values.shape
    rows = torch.arange(n, device=code.values.device).repeat_interleave(width)
    fired = code.values.reshape(-1) != 0
    where = torch.stack([rows[fired], code.indices.reshape(-1)[fired]])
    values = code.values.reshape(-1)[fired]
    return torch.sparse_coo_tensor(where, values, (n, d_sae), check_invariants=False)


class _FastTraining(_FastPath):
    """training_forward_pass on the sparse path, with SAELens's losses."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """SAELens's step: MSE summed over d, mean over rows, plus its AuxK; feature_acts a
        sparse COO (n, d_sae), hidden_pre None."""
        if not self._fast():
            return super().training_forward_pass(step_input)
        x = step_input.sae_in
        sae_in, code, sae_out, norms = self._sparse_forward(x)
        mse = self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()
        aux = self._auxk(x, sae_in, sae_out, step_input.dead_neuron_mask, norms)
        # SAELens's order of the losses, and of their sum.
        losses = {"mse_loss": mse, "auxiliary_reconstruction_loss": aux}
        losses.update(self._extra_losses(step_input, code, norms))
        loss = mse
        for value in list(losses.values())[1:]:
            loss = loss + value
        self._after_step(code)
        feature_acts = self.hook_sae_acts_post(sparse_feature_acts(code, self.cfg.d_sae))
        return TrainStepOutput(
            sae_in=x, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=None,
            loss=loss, losses=losses, metrics=self._metrics(),
        )  # fmt: skip

    def _extra_losses(
        self, step_input: TrainStepInput, code: SparseCode, norms: Tensor | None
    ) -> dict[str, Tensor]:
        return {}

    def _after_step(self, code: SparseCode) -> None:
        pass

    def _metrics(self) -> dict[str, Any]:
        return {}

    def _auxk(
        self, x: Tensor, sae_in: Tensor, sae_out: Tensor, dead: Tensor | None, norms: Tensor | None
    ) -> Tensor:
        """SAELens's AuxK: the top min(d/2, n_dead) pre-activations among the dead latents
        (negative ones too) reconstruct the detached residual x - sae_out without b_dec;
        scaled by min(n_dead / (d/2), 1) and aux_loss_coefficient."""
        if dead is None or (num_dead := int(dead.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = (x - sae_out).detach()
        k_aux = x.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        latents = dead.nonzero().squeeze(1)
        # Only the dead latents' pre-activations: (n, n_dead), not (n, m).
        pre = sae_in @ self.W_enc[:, latents] + self.b_enc[latents]
        if norms is not None:
            pre = pre * norms[latents]
        top = pre.topk(k_aux, dim=-1, sorted=False)
        code = SparseCode(top.values, latents[top.indices])
        recons = self._gather(code, norms, sae_in.new_zeros(self.cfg.d_in))
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * loss


# --- TopK -----------------------------------------------------------------------------------


@dataclass
class FastTopKSAEConfig(TopKSAEConfig):
    """SAELens's TopKSAEConfig (k, rescale_acts_by_decoder_norm, ...) for sae_fast_topk."""

    @classmethod
    def architecture(cls) -> str:
        return "sae_fast_topk"


class FastTopKSAE(_FastPath, TopKSAE):
    """SAELens's inference TopKSAE with sae_fast's encoder and decoder."""


@dataclass
class FastTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """SAELens's TopKTrainingSAEConfig for sae_fast_topk; saves as SAELens's plain topk."""

    @classmethod
    def architecture(cls) -> str:
        return "sae_fast_topk"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


class FastTopKTrainingSAE(_FastTraining, TopKTrainingSAE):
    """SAELens's TopKTrainingSAE trained through sae_fast's sparse ops."""


# --- BatchTopK ------------------------------------------------------------------------------


class _FastBatchTopK(_FastTraining):
    """BatchTopK: the top int(k * n) of the batch's ReLU pre-activations (SAELens's budget)."""

    def _code(self, sae_in: Tensor, norms: Tensor | None) -> SparseCode:
        n, m = sae_in.shape[0], self.cfg.d_sae
        budget = int(self.cfg.k * n)
        width = ops.batch_topk_width(self.cfg.k, m)
        return ops.batch_topk(lambda w: self._topk(sae_in, w, norms), n, m, budget, width)

    def _after_step(self, code: SparseCode) -> None:
        self.update_topk_threshold(code.values)

    def _metrics(self) -> dict[str, Any]:
        return {"topk_threshold": self.topk_threshold}


@dataclass
class FastBatchTopKTrainingSAEConfig(BatchTopKTrainingSAEConfig):
    """SAELens's BatchTopKTrainingSAEConfig for sae_fast_batchtopk; saves as jumprelu."""

    @classmethod
    def architecture(cls) -> str:
        return "sae_fast_batchtopk"


class FastBatchTopKTrainingSAE(_FastBatchTopK, BatchTopKTrainingSAE):
    """SAELens's BatchTopKTrainingSAE trained through sae_fast's sparse ops."""


@dataclass
class FastMatryoshkaBatchTopKTrainingSAEConfig(MatryoshkaBatchTopKTrainingSAEConfig):
    """SAELens's MatryoshkaBatchTopKTrainingSAEConfig for sae_fast_matryoshka_batchtopk."""

    @classmethod
    def architecture(cls) -> str:
        return "sae_fast_matryoshka_batchtopk"


class FastMatryoshkaBatchTopKTrainingSAE(_FastBatchTopK, MatryoshkaBatchTopKTrainingSAE):
    """SAELens's Matryoshka BatchTopK trained through sae_fast's sparse ops: each inner width's
    reconstruction decodes the code's latents below that width."""

    def _fast(self) -> bool:
        return super()._fast() and not self.cfg.use_matryoshka_aux_loss

    def _extra_losses(
        self, step_input: TrainStepInput, code: SparseCode, norms: Tensor | None
    ) -> dict[str, Tensor]:
        losses = {}
        for width in self.cfg.matryoshka_widths[:-1]:
            inner = SparseCode(code.values * (code.indices < width), code.indices)
            # SAELens's inner reconstructions skip hook_sae_recons; so do these.
            recons = self.run_time_activation_norm_fn_out(self._gather(inner, norms, self.b_dec))
            losses[f"inner_mse_loss_{width}"] = (
                self.mse_loss_fn(recons, step_input.sae_in).sum(dim=-1).mean()
            )
        return losses


# --- registration and conversion ------------------------------------------------------------

ARCHITECTURES = {
    "sae_fast_topk": (FastTopKTrainingSAE, FastTopKTrainingSAEConfig),
    "sae_fast_batchtopk": (FastBatchTopKTrainingSAE, FastBatchTopKTrainingSAEConfig),
    "sae_fast_matryoshka_batchtopk": (
        FastMatryoshkaBatchTopKTrainingSAE,
        FastMatryoshkaBatchTopKTrainingSAEConfig,
    ),
}

# SAELens's class -> ours and our config class, for fast().
_FAST_CLASSES = {
    TopKSAE: (FastTopKSAE, FastTopKSAEConfig),
    TopKTrainingSAE: ARCHITECTURES["sae_fast_topk"],
    BatchTopKTrainingSAE: ARCHITECTURES["sae_fast_batchtopk"],
    MatryoshkaBatchTopKTrainingSAE: ARCHITECTURES["sae_fast_matryoshka_batchtopk"],
}


def register() -> None:
    """Register the architectures in SAELens's registries (what importing this module does;
    again is a no-op)."""
    if "sae_fast_topk" not in SAE_CLASS_REGISTRY:
        register_sae_class("sae_fast_topk", FastTopKSAE, FastTopKSAEConfig)
    for name, (sae_class, config_class) in ARCHITECTURES.items():
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, sae_class, config_class)


def fast(sae: SAE) -> SAE:
    """The same SAE (weights, config, metadata, use_error_term) on sae_fast's sparse path: a
    SAELens TopKSAE, TopKTrainingSAE, BatchTopKTrainingSAE or Matryoshka one. An SAE already
    fast is returned as is."""
    if isinstance(sae, _FastPath):
        return sae
    if type(sae) not in _FAST_CLASSES:
        supported = ", ".join(cls.__name__ for cls in _FAST_CLASSES)
        raise TypeError(f"sae must be one of SAELens's {supported}, got {type(sae).__name__}")
    ours, config_class = _FAST_CLASSES[type(sae)]
    # A copy of each field: building the SAE writes into its config (metadata, widths).
    values = {f.name: copy.deepcopy(getattr(sae.cfg, f.name)) for f in fields(sae.cfg) if f.init}
    converted = ours(config_class(**values), use_error_term=sae.use_error_term)
    converted.load_state_dict(sae.state_dict())
    # The device alone: the config gave the dtype, and BatchTopK keeps its threshold in float64.
    return converted.to(device=sae.W_dec.device)


register()
