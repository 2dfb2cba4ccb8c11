"""What a run's checkpoint holds and how a trainer returns to it: the parameters, Adam's
moments, the latent counters, the schedule, the scales, the data position and the random
states, written by one process or as every latent shard's rows, read back in any layout
(checkpoints.py holds the files; this the trainer's side of them)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..parallel.layout import Layout
from ..sae import SparseAutoencoder
from ..sources.base import ActivationSource, broadcasts
from ..version import VERSION
from . import checkpoints
from .config import ConfigError, TrainConfig
from .metrics import LatentStats
from .optimizer import SaeAdam, lr_factor
from .run_folder import RunFolder


class Checkpointing:
    """The saving and restoring half of Trainer (trainer.py), over the trainer's state."""

    cfg: TrainConfig
    source: ActivationSource
    layout: Layout
    folder: RunFolder
    checkpoints: Path
    device: torch.device
    sae: SparseAutoencoder
    optimizer: SaeAdam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    stats: LatentStats
    offset: int
    m_local: int
    step: int
    scale: float | list[float]  # a CLT's per layer, a crosscoder's per source
    output_scale: float | list[float] | None
    batchtopk_threshold: float | list[float] | None

    def provenance(self) -> dict:
        """What the SAE was trained on, for its cfg.json (sae_config.PROVENANCE_KEYS)."""
        described = self.source.describe()
        transcoding = self.cfg.transcoder()
        found = {
            "model": described.get("model"),
            "hook": described.get("hook"),
            "hook_in": self.cfg.hook_in if transcoding else None,
            "hook_out": self.cfg.hook_out if transcoding else None,
            "text": described.get("text"),
            "tokens": self.stats.tokens,
            "step": self.step,
            "sae_fast_version": VERSION,
            "source": described,
            "train": self.cfg.to_dict(),
            "layout": self.layout.describe() if self.layout.distributed else None,
        }
        return {key: value for key, value in found.items() if value is not None}

    def export(self) -> SparseAutoencoder:
        """A copy of the SAE for raw activations: input scale folded in, threshold set,
        provenance recorded."""
        sae = copy.deepcopy(self.sae).eval()
        if sae.activation == "batchtopk" and self.batchtopk_threshold is not None:
            sae.threshold.fill_(self.batchtopk_threshold)
        self._fold(sae)
        sae.provenance = self.provenance()
        return sae

    def _fold(self, sae: SparseAutoencoder) -> None:
        """Fold the input scale into the exported copy sae."""
        sae.fold_input_scale_(self.scale, self.output_scale)

    def _kept_through_export(self) -> tuple[str, ...]:
        """The parameters that _fold leaves as trained (a sharded checkpoint stores the
        training-time values of the others): W_dec, and W_enc unless a transcoder's two
        scales rescale it."""
        return ("W_dec",) if self.sae.transcoder else ("W_enc", "W_dec")

    def _state(self) -> dict:
        """What the step depends on besides the tensors with a row per latent."""
        # This device's CUDA generator alone: a resume may see fewer GPUs.
        cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "layout": self.layout.describe(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scale": self.scale,
            "output_scale": self.output_scale,
            "batchtopk_threshold": self.batchtopk_threshold,
            "source": self.source.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
        }

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (atomic; keeps the newest few).

        Its SAE is the exported one; the state keeps the training-time values of the
        tensors that exporting changed (the biases, thresholds), for an exact resume.
        """
        exported = self.export()
        ours, theirs = self.sae.state_dict(), exported.state_dict()
        state = self._state()
        if self.layout.distributed:
            return self._save_sharded(exported.config(), ours, theirs, state)
        state["optimizer"] = self.optimizer.state_dict()
        state["stats"] = self.stats.state_dict()
        state["train_tensors"] = {
            name: t for name, t in ours.items() if not torch.equal(t, theirs[name])
        }
        return checkpoints.save(
            self.checkpoints,
            self.step,
            lambda folder: checkpoint.write(folder, exported.config(), theirs),
            state,
            self.cfg.keep_checkpoints,
        )

    def _save_sharded(
        self, config: dict, ours: dict[str, Tensor], exported: dict[str, Tensor], state: dict
    ) -> Path:
        """The checkpoint as every rank's shard (checkpoints.save_sharded): the tensors
        with a row per latent go to the row shards, train_state.pt keeps the rest."""
        # The training-time values of what exporting may change, by name, so every shard
        # stores the same names.
        kept = self._kept_through_export()
        named = {f"param.{n}": t for n, t in ours.items() if n not in kept}
        for name, p in self.sae.named_parameters():
            for key, value in self.optimizer.state.get(p, {}).items():
                named[f"adam.{name}.{key}"] = value
        for key in LatentStats.COUNTERS:
            named[f"stats.{key}"] = getattr(self.stats, key)
        state["optimizer_groups"] = self.optimizer.state_dict()["param_groups"]
        state["stats"] = {"tokens": self.stats.tokens, "window_tokens": self.stats.window_tokens}
        state["source"] = self._gather_sources(state["source"])
        sae_rows, sae_whole = split_rows(exported)
        return checkpoints.save_sharded(
            self.checkpoints,
            self.step,
            (config, sae_rows, sae_whole),
            split_rows(named),
            state,
            self.cfg.keep_checkpoints,
            self.layout,
        )

    def _gather_sources(self, mine: dict) -> list[dict] | None:
        """On rank 0, one stream state per data rank: its first latent shard's (the one that
        draws); None on the others."""
        sources = [None] * self.layout.world if self.layout.main else None
        dist.gather_object(mine, sources, dst=0)
        return sources[:: self.layout.latent] if sources else None

    def save_sae(self, sae: SparseAutoencoder, folder: Path) -> None:
        """sae (this rank's shard of it) as one sae_fast folder, written by its shards."""
        if not self.layout.distributed:
            sae.save(folder)
            return
        rows, whole = split_rows(sae.state_dict())
        checkpoints.save_sharded_sae(folder, sae.config(), rows, whole, self.layout)

    def _resume(self, checkpoint: Path) -> None:
        """Continue from checkpoint (RunFolder.start's): the state as saved, checked."""
        try:
            self._restore_from(checkpoint)
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a damaged state
            raise CheckpointError(
                f"--resume: checkpoint {checkpoint} is incomplete or damaged ({e!r}); resume "
                "from another one (--resume FOLDER) or start a new run"
            ) from None
        self.folder.resumed(self.step, checkpoint)

    def _restore_from(self, folder: Path) -> None:
        """The run's state as the checkpoint folder holds it (CheckpointState: any layout)."""
        names = [name for name, _ in self.sae.named_parameters()]
        self._restore(checkpoints.CheckpointState(folder, self.device, names), folder)

    def _restore(self, saved: checkpoints.CheckpointState, folder: Path) -> None:
        """The run's state as saved: parameters, optimizer, schedule, counters, data
        position, step, scales and random states."""
        state, config = saved.state, saved.config
        self.folder.check_options(
            self.cfg, state["config"], state["step"], folder, self.sae.n_latents
        )
        if (config["d_in"], config["n_latents"]) != (self.sae.d_in, self.sae.n_latents):
            raise ConfigError(
                f"--resume: checkpoint {folder} has d_in={config['d_in']}, "
                f"n_latents={config['n_latents']}; this run has d_in={self.sae.d_in}, "
                f"n_latents={self.sae.n_latents}"
            )
        self._load_tensors(saved)
        self._restore_run(state, folder)

    def _restore_run(self, state: dict, folder: Path) -> None:
        """What every trainer's checkpoint holds besides its tensors: schedule, loss scaler,
        token counts, data position, step, scales, thresholds and random states."""
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # fp16 on both sides of the resume
            self.scaler.load_state_dict(state["scaler"])
        self.stats.tokens = state["stats"]["tokens"]
        self.stats.window_tokens = state["stats"]["window_tokens"]
        self._load_source(state["source"], folder)
        self.step, self.scale = state["step"], state["scale"]
        self.output_scale = state.get("output_scale")  # (older checkpoints: SAEs only)
        self.batchtopk_threshold = state["batchtopk_threshold"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and self.device.type == "cuda":  # (older: one per GPU)
            saved_rng = state["rng"]["cuda"]
            index = min(self.device.index or 0, len(saved_rng) - 1) if len(saved_rng) > 1 else 0
            torch.cuda.set_rng_state(saved_rng[index].cpu(), self.device)
        self._apply_optimizer_options()

    def _load_tensors(self, saved: checkpoints.CheckpointState) -> None:
        """This rank's rows of the parameters, Adam's moments and the counters, from a
        checkpoint of any layout."""

        def read(name: str) -> Tensor:
            return saved.read(name, self.offset, self.m_local)

        self.sae.load_state_dict({name: read(f"param.{name}") for name in self.sae.state_dict()})
        present = saved.names()
        groups = saved.state.get("optimizer_groups") or saved.state["optimizer"]["param_groups"]
        moments = {}
        for i, (name, _) in enumerate(self.sae.named_parameters()):
            keys = [n.rsplit(".", 1)[1] for n in present if n.startswith(f"adam.{name}.")]
            moments[i] = {key: read(f"adam.{name}.{key}") for key in keys}
        self.optimizer.load_state_dict({"state": moments, "param_groups": groups})
        for key in LatentStats.COUNTERS:
            setattr(self.stats, key, read(f"stats.{key}").to(self.device))

    def _load_source(self, saved: dict | list, folder: Path) -> None:
        """The data position: one stream's state, or one per data rank of a distributed run
        (a stream every rank shares resumes in any layout; a model's per rank, in the same)."""
        if isinstance(saved, dict):
            saved = [saved]
        rank = self.layout.data_rank if broadcasts(self.source) else 0
        if rank >= len(saved):
            raise ConfigError(
                f"--resume: checkpoint {folder} holds the data streams of {len(saved)} "
                f"data-parallel ranks; with a model source resume with that many"
            )
        self.source.load_state_dict(saved[rank])

    def _apply_optimizer_options(self) -> None:
        """The optimizer's state holds the checkpoint's lr, betas and eps: use this run's."""
        cfg = self.cfg
        peak = cfg.peak_lr(self.sae.n_latents)
        self.scheduler.base_lrs = [peak for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = peak, peak * lr_factor(self.step, cfg)
            group["betas"], group["eps"] = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps


def split_rows(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the tensors with a row per latent, the others) of a state dict."""
    rows = {n: t for n, t in tensors.items() if checkpoints.is_row(n, t)}
    return rows, {n: t for n, t in tensors.items() if n not in rows}
