"""The crosscoder's trainer: one dictionary over several sources at once (Lindsey et al. 2024,
"Sparse crosscoders"), acausal: every latent reads all the sources and writes to each of
them.

A crosscoder is an SAE over the sources side by side: `pre = sum_s (x_s - b_dec_s) W_enc_s.T
+ b_enc` and `x_hat_s = z W_dec_s + b_dec_s`, with W_enc and W_dec (m, sum of widths) holding
each source's block of columns. The sparse fast path, sharding, checkpoints and exact resume
are the SAE's, and the saved crosscoder is an SAE folder every loader reads; its provenance's
"crosscoder" names the sources and their widths. A latent's decoder norm per source is free
(the unit-norm constraint holds for its whole row while training), which is what model
diffing reads (analysis/model_diff.py). Trainer with these differences:
- Sources: several hook points of one model, or the same hook points of model and model_b on
  the same tokens (sources.model_source with crosscoder).
- Normalisation per source: each scaled to mean norm sqrt(width) from the first init_tokens
  rows, so that no source outweighs the others for being larger; folded in at export
  (SparseAutoencoder.fold_column_scales_).
- Metrics per source in each log row: fvu/S and mse/S (raw units), besides the row's fvu (all
  sources' error over all their variance, as trained), mse (raw units) and l0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae import SparseAutoencoder
from .losses import StepOutput
from .metrics import parts_metrics, reconstruction_sums
from .trainer import Trainer, norm_scale


def source_names(hooks: list[str], two_models: bool) -> list[str]:
    """The sources a crosscoder reads, in its columns' order: its hook points, each as "a:"
    and "b:" HOOK with two models."""
    return [f"{side}:{hook}" for side in "ab" for hook in hooks] if two_models else list(hooks)


class CrosscoderTrainer(Trainer):
    """Train a crosscoder over cfg's sources on source (a ModelSource whose widths are the
    sources'), as the module docstring says; resume and layout as Trainer's."""

    def _build(self) -> None:
        super()._build()
        self.widths = list(self.source.widths)
        self.sources = source_names(self.cfg.crosscoder_hooks(), self.cfg.model_b is not None)
        self.scale = [1.0] * len(self.widths)

    def _columns(self, values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
        """(d_in,): each source's value over its columns."""
        widths = torch.tensor(self.widths, device=device)
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(widths)

    def _inputs(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        x = rows * self._columns(self.scale, rows.dtype, rows.device)
        return x, x

    def _set_scales(self, rows: Tensor) -> None:
        self.scale = [norm_scale(part) for part in rows.split(self.widths, dim=1)]

    def _metrics(self, target: Tensor, res: StepOutput) -> dict[str, float]:
        pairs = zip(
            target.split(self.widths, dim=1), res.out.x_hat.split(self.widths, dim=1), strict=True
        )
        parts = [reconstruction_sums(x, x_hat, res.out.code) for x, x_hat in pairs]
        found, per_source = parts_metrics(self._global_sums(parts), self.scale)
        for name, metrics in zip(self.sources, per_source, strict=True):
            found.update({f"fvu/{name}": metrics["fvu"], f"mse/{name}": metrics["mse"]})
        return found

    def _fold(self, sae: SparseAutoencoder) -> None:
        sae.fold_column_scales_(self._columns(self.scale, torch.float64, sae.W_enc.device))

    def _kept_through_export(self) -> tuple[str, ...]:
        return ()  # the column scales rescale W_enc and W_dec

    def _run_facts(self) -> dict:
        return {**super()._run_facts(), "sources": self.sources, "widths": self.widths}

    def provenance(self) -> dict:
        found = super().provenance()
        found["crosscoder"] = {
            "sources": self.sources, "widths": self.widths, "scales": self.scale,
        }  # fmt: skip
        if self.cfg.model_b is not None:
            found["crosscoder"]["model_b"] = self.cfg.model_b
        return found
