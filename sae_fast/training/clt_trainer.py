"""The cross-layer transcoder's trainer: Trainer's loop, run folder and checkpoints around a
CrossLayerTranscoder (sae_fast.clt) that predicts every layer's MLP output from every layer's
MLP input.

What differs from an SAE's run:
- Rows: a source over mlp_in.A..B, then mlp_out.A..B (sources.model_source with clt) gives a
  token's L inputs and L outputs side by side; they train as x (L, n, d_in), y (L, n, d_out).
- Normalisation per layer: each layer's input and output scaled to mean norm sqrt(d) (from
  the first init_tokens rows), folded in at export (CrossLayerTranscoder.fold_scales_); b_dec
  starts at each output's mean or geometric median.
- Loss: clt_losses.clt_training_loss (the sum over target layers of the squared error, AuxK
  on each layer's dead features, relu's and jumprelu's sparsity penalty with coefficient
  l1_coef and l0_coef). The decoders are free: their norms weight the sparsity penalty.
- Metrics per layer in each log row: fvu/T, mse/T (target layer T) and l0/T (source layer
  T's features per token), besides fvu (all layers' error over all layers' variance), mse
  and l0 (means over the layers). The latent counters cover every layer's features.
- Checkpoints: the exported CLT (clt.safetensors + cfg.json) and train_state.pt, whose
  "tensors" hold the optimizer's moments, the counters and the training-time values of what
  exporting changes. A latent-parallel run's shards gather their blocks into that one layout
  (a tensor at a time, parallel.clt.gather_features), so a checkpoint resumes in any layout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .. import formats
from ..clt.config import feature_dim
from ..clt.module import CrossLayerTranscoder
from ..formats import clt_native
from ..ops import SparseCode
from ..options import SPARSE_ACTIVATIONS, clt_hooks
from ..parallel.clt import ShardedCrossLayerTranscoder, gather_features
from ..parallel.layout import all_sum
from ..sae import data_center
from ..validation import check_fits
from . import checkpoints
from .clt_losses import CLTLossWeights, clt_training_loss
from .config import ConfigError
from .losses import StepOutput
from .metrics import LatentStats, firing_counts, parts_metrics, reconstruction_sums
from .trainer import Trainer, norm_scale, parameter_bytes, track_threshold


def _state_dim(name: str) -> int | None:
    """The feature dim of a checkpoint's state tensor: "param.NAME", "adam.NAME.KEY" (Adam's
    step: none) or "stats.KEY" (counters kept as (L, m))."""
    kind, _, rest = name.partition(".")
    if kind == "stats":
        return 1
    if kind == "adam":
        param, _, key = rest.rpartition(".")
        return None if key == "step" else feature_dim(param)
    return feature_dim(rest)


class CLTTrainer(Trainer):
    """Train a cross-layer transcoder over cfg.layers on source, as the module docstring
    says; resume and layout as Trainer's."""

    sae: CrossLayerTranscoder

    def _build(self) -> None:
        cfg, layout = self.cfg, self.layout
        self.layers = [int(h.rpartition(".")[2]) for h in clt_hooks(cfg.layers)[0]]
        L = self.n_layers = len(self.layers)
        widths = list(getattr(self.source, "widths", ()))
        if len(widths) != 2 * L or len(set(widths[:L])) > 1 or len(set(widths[L:])) > 1:
            raise ConfigError(
                f"clt over layers {cfg.layers}: the source's rows must hold {L} inputs of one "
                f"width, then {L} outputs of one width; its widths are {widths}"
            )
        d_in, d_out = widths[0], widths[L]
        m = cfg.latents(d_in)
        sparse = cfg.activation in SPARSE_ACTIVATIONS
        self._check_layout(m, sparse)
        self.offset, self.m_local = layout.latents(m)
        # Per feature index: L encoder rows and the decoders to every target of every layer.
        width = L * d_in + L * (L + 1) // 2 * d_out
        batch = cfg.batch_size // layout.data
        # A batch's rows, x and y, the prediction and its error; dense activations' (L, n, m).
        rows = 4 * max(batch, cfg.init_tokens) * L * (d_in + d_out)
        dense = 0 if sparse else 4 * batch * L * m
        per_shard = f", {self.m_local} features per shard" if layout.latent > 1 else ""
        shape = f"{L} layers x n_latents={m}, d_in={d_in}, d_out={d_out}"
        for nbytes, what in [
            (parameter_bytes(self.m_local, width, self.dtype, cfg.adam_moments),
             f"a CLT of {shape} ({cfg.dtype}, with Adam{per_shard})"),
            ((rows + dense) * self.dtype.itemsize,
             f"batch_size={cfg.batch_size} / init_tokens={cfg.init_tokens} of {shape}"),
        ]:  # fmt: skip
            check_fits(nbytes, what, self.device, ConfigError)
        if sparse and cfg.k > m:
            raise ConfigError(f"k={cfg.k} is larger than the dictionary (n_latents={m})")
        k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_out // 2)
        sparsity = cfg.l0_coef if cfg.activation == "jumprelu" else cfg.l1_coef
        self.weights = CLTLossWeights(auxk=cfg.auxk_coef, k_aux=min(k_aux, m), sparsity=sparsity)
        torch.manual_seed(cfg.seed)
        options = dict(
            k=cfg.k if sparse else None, activation=cfg.activation, d_out=d_out,
            skip_connection=cfg.skip_connection, dtype=self.dtype, device=self.device,
            backend=cfg.backend,
        )  # fmt: skip
        if layout.latent > 1:
            self.sae = ShardedCrossLayerTranscoder(
                L, d_in, m, offset=self.offset, size=self.m_local, group=layout.latent_group,
                **options,
            )  # fmt: skip
        else:
            self.sae = CrossLayerTranscoder(
                L, d_in, m, jumprelu_bandwidth=cfg.jumprelu_bandwidth, **options
            )
        self.sae.seed_parameters_(cfg.seed)
        self.optimizer = self._adam(m, project=False, renormalise=False)
        self.stats = LatentStats(L * self.m_local, self.device)  # layer by layer
        self.scale, self.output_scale = [1.0] * L, [1.0] * L

    # --- data ----------------------------------------------------------------------------

    def _inputs(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(x (L, n, d_in), y (L, n, d_out)) of a batch's rows, each layer scaled as the CLT
        trains on it."""
        L, n, d_in = self.n_layers, rows.shape[0], self.sae.d_in
        x = rows[:, : L * d_in].reshape(n, L, d_in).transpose(0, 1)
        y = rows[:, L * d_in :].reshape(n, L, -1).transpose(0, 1)

        def scaled(t: Tensor, scales: list[float]) -> Tensor:
            return (t * t.new_tensor(scales)[:, None, None]).contiguous()

        return scaled(x, self.scale), scaled(y, self.output_scale)

    def _set_scales(self, rows: Tensor) -> None:
        x, y = self._inputs(rows)  # (every scale still 1)
        self.scale = [norm_scale(layer) for layer in x]
        self.output_scale = [norm_scale(layer) for layer in y]

    def _set_b_dec(self, target: Tensor) -> None:
        for t, y in enumerate(target):
            self.sae.b_dec[t].copy_(data_center(y, self.cfg.b_dec_init))

    # --- the step ------------------------------------------------------------------------

    def _loss(self, x: Tensor, target: Tensor) -> StepOutput:
        dead = self.stats.dead_mask(self.cfg.dead_tokens).view(self.n_layers, -1)
        return clt_training_loss(self.sae, x, target, self.weights, dead, self._sparsity_scale())

    def _layer_codes(self, res: StepOutput) -> list[SparseCode]:
        values, indices = res.out.code
        return [SparseCode(v, i) for v, i in zip(values, indices, strict=True)]

    def _count(self, res: StepOutput) -> None:
        codes = self._layer_codes(res)
        counts = torch.stack([firing_counts(code, self.sae.n_latents) for code in codes])
        counts = counts[:, self.offset : self.offset + self.m_local].reshape(-1)
        self.stats.update(all_sum(counts, self.layout.data_group), self.cfg.batch_size)
        if self.sae.activation == "batchtopk":
            previous = self.batchtopk_threshold or [None] * self.n_layers
            self.batchtopk_threshold = [
                track_threshold(t, code.values) for t, code in zip(previous, codes, strict=True)
            ]

    def _metrics(self, target: Tensor, res: StepOutput) -> dict[str, float]:
        codes = self._layer_codes(res)
        parts = [
            reconstruction_sums(y, y_hat, code)
            for y, y_hat, code in zip(target, res.out.y_hat, codes, strict=True)
        ]
        found, per_layer = parts_metrics(self._global_sums(parts), self.output_scale)
        for layer, metrics in zip(self.layers, per_layer, strict=True):
            found.update({f"{name}/{layer}": metrics[name] for name in ("fvu", "mse", "l0")})
        return found

    # --- what a run writes ---------------------------------------------------------------

    def _run_facts(self) -> dict:
        clt = self.sae
        return {
            "layers": self.layers,
            "n_layers": clt.n_layers,
            "d_in": clt.d_in,
            "d_out": clt.d_out,
            "n_latents": clt.n_latents,
            "input_scale": self.scale,
            "output_scale": self.output_scale,
        }

    def provenance(self) -> dict:
        found = super().provenance()
        found.pop("hook", None)  # the source's hook points, which hooks_in and hooks_out split
        if self.cfg.source == "model":
            found["hooks_in"], found["hooks_out"] = clt_hooks(self.cfg.layers)
        return found

    def export(self) -> CrossLayerTranscoder:
        """A copy of the CLT (this rank's block) for raw activations: the scales folded in,
        batchtopk's thresholds set, provenance recorded."""
        clt = copy.deepcopy(self.sae).eval()
        thresholds = self.batchtopk_threshold
        if clt.activation == "batchtopk" and thresholds and None not in thresholds:
            clt.threshold.copy_(torch.tensor(thresholds))
        clt.fold_scales_(torch.tensor(self.scale), torch.tensor(self.output_scale))
        clt.provenance = self.provenance()
        return clt

    def _whole(self, tensors: dict[str, Tensor], dim) -> dict[str, Tensor]:
        """tensors (this rank's blocks) whole on rank 0's CPU, every shard's block along
        dim(name), gathered a tensor at a time; empty on the other ranks."""
        whole, group = {}, self.layout.latent_group
        for name, t in tensors.items():
            gathered = gather_features(t, dim(name), group)
            if self.layout.main:
                whole[name] = gathered.cpu()
        return whole

    def save_checkpoint(self) -> Path:
        """The checkpoint of this step: the exported CLT, whole, and the training state
        (atomic; rank 0 writes it; keeps the newest few)."""
        exported = self.export()
        ours, theirs = self.sae.state_dict(), exported.state_dict()
        # The training-time values of what exporting changed, by names every shard agrees on.
        changed = [not torch.equal(ours[n], theirs[n]) for n in ours]
        changed = all_sum(
            torch.tensor(changed, device=self.device).long(), self.layout.latent_group
        )
        blocks = {f"param.{n}": ours[n] for n, c in zip(ours, changed.tolist(), strict=True) if c}
        for name, p in self.sae.named_parameters():
            for key, value in self.optimizer.state.get(p, {}).items():
                blocks[f"adam.{name}.{key}"] = value
        for key in LatentStats.COUNTERS:
            blocks[f"stats.{key}"] = getattr(self.stats, key).view(self.n_layers, -1)
        state = self._state()
        state["tensors"] = self._whole(blocks, _state_dim)
        state["optimizer_groups"] = self.optimizer.state_dict()["param_groups"]
        state["stats"] = {"tokens": self.stats.tokens, "window_tokens": self.stats.window_tokens}
        model = self._whole(theirs, feature_dim)
        if self.layout.distributed:
            state["source"] = self._gather_sources(state["source"])
        folder = self.checkpoints / checkpoints.folder_name(self.step)
        if self.layout.main:
            config = exported.config()
            folder = checkpoints.save(
                self.checkpoints, self.step,
                lambda tmp: clt_native.save(config, model, tmp),
                {**state, "layout": checkpoints.SINGLE}, self.cfg.keep_checkpoints,
            )  # fmt: skip
        if self.layout.distributed:
            dist.barrier()
        return folder

    def save_sae(self, sae: CrossLayerTranscoder, folder: Path) -> None:
        """The CLT (this rank's block of it) as one sae_fast folder, written by rank 0."""
        tensors = self._whole(sae.state_dict(), feature_dim)
        if self.layout.main:
            formats.save(sae.config(), tensors, folder, kind="clt")
        if self.layout.distributed:
            dist.barrier()

    def _restore_from(self, folder: Path) -> None:
        """This rank's block of the CLT, Adam's moments and the counters, then the run's
        state, from a checkpoint written in any layout."""
        # On the CPU: each rank moves only its block to its device.
        state = checkpoints.read_state(folder, "cpu")
        config, tensors = clt_native.load(folder)
        self.folder.check_options(
            self.cfg, state["config"], state["step"], folder, self.sae.n_latents
        )
        clt = self.sae
        want = (clt.n_layers, clt.d_in, clt.d_out, clt.n_latents)
        have = (config["n_layers"], config["d_in"], config["d_out"] or config["d_in"],
                config["n_latents"])  # fmt: skip
        if have != want:
            raise ConfigError(
                f"--resume: checkpoint {folder} has (n_layers, d_in, d_out, n_latents) = "
                f"{have}; this run has {want}"
            )
        saved = state["tensors"]

        def block(name: str, t: Tensor) -> Tensor:
            dim = _state_dim(name)
            part = t if dim is None else t.narrow(dim, self.offset, self.m_local)
            return part.clone().to(self.device)

        clt.load_state_dict(
            {n: block(f"param.{n}", saved.get(f"param.{n}", tensors[n])) for n in clt.state_dict()}
        )
        moments = {}
        for i, (name, _) in enumerate(clt.named_parameters()):
            prefix = f"adam.{name}."
            moments[i] = {
                key.removeprefix(prefix): block(key, t)
                for key, t in saved.items()
                if key.startswith(prefix)
            }
        self.optimizer.load_state_dict(
            {"state": moments, "param_groups": state["optimizer_groups"]}
        )
        for key in LatentStats.COUNTERS:
            setattr(self.stats, key, block(f"stats.{key}", saved[f"stats.{key}"]).reshape(-1))
        self._restore_run(state, folder)
