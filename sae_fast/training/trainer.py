"""The trainer: an SAE fitted to a stream of activations, with checkpoints that resume exactly.

One optimizer step draws grad_accum micro-batches of batch_size activations from the source,
computes the activation's loss (losses.py) and takes one Adam step that also removes the
decoder gradient parallel to each row and renormalises the decoder (optimizer.py). A
checkpoint holds everything the next step depends on, so N steps, a stop and N resumed steps
give the weights of 2N straight steps.

Under torchrun the same loop runs on every process of a Layout (layout.py): each data rank
trains on its slice of the global batch and the data group averages the gradients; each
latent shard holds its block of the latents (ShardedSparseAutoencoder: exact sharded ops).
The losses, metrics and latent counters are the global batch's, so any layout trains the
weights one process would, up to the order of floating-point sums. Rank 0 logs and writes
the run's files; every rank of data rank 0 writes its shard of the checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..checkpoint import CheckpointError
from ..files import LOCK_FILE, atomic_path, clean_stale, lock_folder
from ..options import AUTOCAST_DTYPES, SPARSE_ACTIVATIONS, parse_matryoshka
from ..sae import SparseAutoencoder
from ..sharded_sae import ShardedSparseAutoencoder
from ..sources.base import ActivationSource, part_rows
from ..validation import check_fits, parse_dtype
from ..version import VERSION
from . import checkpoints
from .config import REFUSE, ConfigError, TrainConfig, resolve_device
from .layout import Layout, agree, all_sum, broadcast_first, local_device
from .loggers import open_sinks
from .losses import LossWeights, training_loss
from .metrics import LatentStats, MetricsLog, firing_counts, metrics_from_sums, reconstruction_sums
from .optimizer import SaeAdam, moment_dtype

RUN_LOCK = "sae-fast training run"  # what holds a run folder's lock, as messages say
_BATCHTOPK_EMA = 0.01  # threshold estimate update rate (Bussmann et al. 2024)


class TrainingDivergedError(RuntimeError):
    """Loss or activations became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class Loop:
    """A run between Trainer.running() and finish(): its last step, logs and last row."""

    stop: int
    log: MetricsLog
    sinks: Any
    bar: Any
    label: str
    started: float
    tokens_at: int
    row: dict = dataclasses.field(default_factory=dict)


@dataclass
class TrainResult:
    """sae: the trained SAE for raw activations (input scale folded in); final: last metrics."""

    sae: SparseAutoencoder
    step: int
    final: dict
    out_dir: Path
    interrupted: bool


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


class Trainer:
    """Train an SAE on source as cfg says, in cfg.out_dir.

    resume: False starts a new run (refusing a folder that already holds checkpoints), True
    continues from the newest checkpoint in out_dir, a path continues from that checkpoint
    (the newer checkpoints of out_dir, another branch of the run, move to checkpoints/
    abandoned-TIME/). Options that shaped the SAE or its data must match the checkpoint's;
    the others apply from the resumed step on (config.py marks which). out_dir is locked
    from here to the end of train(): a second trainer on it gets FolderInUseError.
    layout: this process's place in a distributed run (layout.init_layout); every process
    of the run builds its Trainer with the same cfg and source options.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        source: ActivationSource,
        resume: bool | str | Path = False,
        layout: Layout | None = None,
    ) -> None:
        self.cfg, self.source = cfg, source
        self.layout = layout = layout or Layout()
        self.out_dir = Path(cfg.out_dir)
        self.checkpoints = self.out_dir / checkpoints.CHECKPOINTS_DIR
        self.device = resolve_device(local_device(cfg.device))
        self.dtype = parse_dtype(cfg.dtype)
        # A transcoder's source reads (hook_in, hook_out): rows of the two side by side.
        d_in, d_out = source.widths if cfg.transcoder() else (source.d_in, None)
        m = cfg.latents(d_in)
        sparse = cfg.activation in SPARSE_ACTIVATIONS
        self._check_layout(m, sparse)
        prefixes = self._matryoshka(m)
        self.offset, self.m_local = layout.latents(m)
        # Parameters, their gradients and Adam's two moments: four copies of this shard of
        # W_enc and W_dec; a batch's rows and, for the dense activations, its latents.
        size = self.dtype.itemsize
        batch = cfg.batch_size // layout.data
        dense = 0 if sparse else 4 * batch * m
        # A Matryoshka step holds a few (batch, prefixes, d_out) tensors: sums and errors.
        nested = 3 * len(prefixes) * batch * (d_out or d_in) if prefixes else 0
        per_shard = f", {self.m_local} latents per shard" if layout.latent > 1 else ""
        width = d_in + (d_out or d_in)  # W_enc's and W_dec's rows
        out = f", d_out={d_out}" if d_out else ""
        for nbytes, what in [
            (parameter_bytes(self.m_local, width, self.dtype, cfg.adam_moments),
             f"n_latents={m} x d_in={d_in}{out} ({cfg.dtype}, with Adam{per_shard})"),
            (2 * max(batch, cfg.init_tokens) * width * size + dense * size + nested * size,
             f"batch_size={cfg.batch_size} / init_tokens={cfg.init_tokens} x d_in={d_in}{out}"),
        ]:  # fmt: skip
            check_fits(nbytes, what, self.device, ConfigError)
        # AuxK's default: half the width of what it reconstructs (Gao et al. 2024).
        k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, (d_out or d_in) // 2)
        if sparse and cfg.k > m:
            raise ConfigError(f"k={cfg.k} is larger than the dictionary (n_latents={m})")
        self.weights = LossWeights(
            auxk=cfg.auxk_coef, k_aux=min(k_aux, m), l1=cfg.l1_coef, l0=cfg.l0_coef
        )
        torch.manual_seed(cfg.seed)
        options = dict(dtype=self.dtype, device=self.device, backend=cfg.backend)
        if layout.latent > 1:
            self.sae: SparseAutoencoder = ShardedSparseAutoencoder(
                d_in, m, offset=self.offset, size=self.m_local, group=layout.latent_group,
                k=cfg.k, activation=cfg.activation, matryoshka=prefixes, **options,
            )  # fmt: skip
        else:
            self.sae = SparseAutoencoder(
                d_in, m, k=cfg.k if sparse else None, activation=cfg.activation,
                jumprelu_bandwidth=cfg.jumprelu_bandwidth, matryoshka=prefixes,
                transcoder=cfg.transcoder(), d_out=d_out,
                skip_connection=cfg.skip_connection, **options,
            )  # fmt: skip
        self.sae.seed_parameters_(cfg.seed)
        # Clipping needs the projected gradient's norm: then the projection comes first.
        self.optimizer = SaeAdam(
            self.sae,
            lr=cfg.peak_lr(m),
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            project=cfg.normalize_decoder and not cfg.grad_clip,
            renormalise=cfg.normalize_decoder,
            moments=cfg.adam_moments,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg)
        )
        self.amp_dtype = amp = parse_dtype(AUTOCAST_DTYPES[cfg.autocast])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.stats = LatentStats(self.m_local, self.device)
        self.step = 0
        self.scale = 1.0
        self.output_scale: float | None = None  # a transcoder's target's (None: scale)
        self.batchtopk_threshold: float | None = None
        self._lock = None
        self.acquire()
        try:
            if layout.main:
                for folder in (self.out_dir, self.checkpoints):
                    clean_stale(folder)
            found = agree(checkpoints.list_checkpoints(self.checkpoints), layout)
            if resume:
                self._resume(resume, found)
            elif found:
                raise occupied(self.out_dir)
            else:
                self._initialise()
        except BaseException:
            self.close()
            raise

    # --- setup -------------------------------------------------------------------------

    def _check_layout(self, m: int, sparse: bool) -> None:
        cfg, layout = self.cfg, self.layout
        if layout.latent > 1:
            if cfg.transcoder():
                raise ConfigError(
                    f"a transcoder with latent_parallel={layout.latent}: not sharded yet; use "
                    "data parallelism (latent_parallel=1)"
                )
            if not sparse:
                raise ConfigError(
                    f"latent_parallel={layout.latent} shards the TopK activations "
                    f"{SPARSE_ACTIVATIONS}, not activation={cfg.activation!r} (use data "
                    "parallelism alone: latent_parallel=1)"
                )
            if m % layout.latent:
                raise ConfigError(
                    f"n_latents={m} must be a multiple of latent_parallel={layout.latent}"
                )
            if cfg.autocast == "fp16":
                raise ConfigError(
                    "autocast=fp16 with latent_parallel > 1: the loss scaler would skip steps "
                    "on some shards only; use bf16"
                )
        if layout.data > 1:
            if cfg.batch_size % layout.data:
                raise ConfigError(
                    f"batch_size={cfg.batch_size} (the global batch) must be a multiple of "
                    f"the {layout.data} data-parallel ranks"
                )
            if cfg.activation == "batchtopk":
                raise ConfigError(
                    "activation=batchtopk selects over the whole batch, which data parallelism "
                    "splits; use latent_parallel = the world size"
                )

    def _matryoshka(self, m: int) -> list[int] | None:
        """The prefix sizes --matryoshka names for m latents, or None."""
        return None if self.cfg.matryoshka is None else self.cfg.matryoshka_prefixes(m)

    def acquire(self) -> None:
        """Lock out_dir (again, after close()); FolderInUseError if another run holds it."""
        if self._lock is None and self.layout.main:
            self._lock = lock_folder(self.out_dir, RUN_LOCK)
            self._lock.__enter__()

    def close(self) -> None:
        """Release out_dir (train() does at its end; a later train() takes it again)."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def _batch(self, n: int, whole: bool = False) -> Tensor:
        """This rank's rows of the next global batch of n (whole: all n, on every rank), as
        the source gives them (a transcoder's: input and output side by side)."""
        layout, source = self.layout, self.source
        part = (layout.data_rank, layout.data)
        if not layout.distributed:  # any source, part or not
            x = source.next_batch(n).to(self.device, self.dtype)
        elif not _broadcasts(source):  # the same stream on every rank: each keeps its rows
            x = source.next_batch(n, part=(0, 1) if whole else part).to(self.device, self.dtype)
        else:  # one rank draws and sends: rank 0 to all (from its own stream), or per group
            group = None if whole else layout.latent_group
            drawer = layout.main if whole else layout.latent_rank == 0
            lo, hi = (0, n) if whole else part_rows(n, *part)
            x = None
            if drawer:  # (whole: n * data rows, of which this rank's part is n)
                x = source.next_batch(n * layout.data if whole else n, part=part)
                x = x.to(self.device, self.dtype)
            if whole or group is not None:
                x = broadcast_first(x, (hi - lo, source.d_in), self.dtype, self.device, group)
        return x

    def _inputs(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(x, target) of a batch's rows, scaled as the SAE trains on them: the same tensor
        for an SAE, a transcoder's input and output activations for one."""
        x, target = self.sae.split_rows(rows)
        scaled = x * self.scale if self.scale != 1.0 else x
        if not self.sae.transcoder:
            return scaled, scaled
        out = self.output_scale
        return scaled, target * out if out not in (None, 1.0) else target

    @torch.no_grad()
    def _initialise(self) -> None:
        """Input scale and b_dec from the first init_tokens activations (the same on every
        rank)."""
        rows = self._batch(self.cfg.init_tokens, whole=True)
        if not bool(torch.isfinite(rows).all()):
            raise TrainingDivergedError("the first activations drawn hold NaN or Inf")
        if self.cfg.normalize_input:
            x, target = self.sae.split_rows(rows)
            self.scale = _norm_scale(x)
            if self.sae.transcoder:
                self.output_scale = _norm_scale(target)
        _, target = self._inputs(rows)
        if self.cfg.b_dec_init != "zeros":
            self.sae.set_b_dec_from_data(target, method=self.cfg.b_dec_init)

    # --- the step ------------------------------------------------------------------------

    def _sparsity_scale(self) -> float:
        warmup = self.cfg.sparsity_warmup_steps
        return min(1.0, (self.step + 1) / warmup) if warmup else 1.0

    def _train_step(self) -> dict[str, float]:
        cfg, sae, layout = self.cfg, self.sae, self.layout
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            x, target = self._inputs(self._batch(cfg.batch_size))
            dead = self.stats.dead_mask(cfg.dead_tokens)
            amp = self.amp_dtype is not None
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
                res = training_loss(
                    sae, x, self.weights, dead, self._sparsity_scale(), target=target
                )
            # The global batch's loss and terms: the mean of the data ranks' equal parts.
            names = ["loss", *res.terms]
            values = torch.stack([res.loss.detach(), *res.terms.values()]).double()
            values = (all_sum(values, layout.data_group) / layout.data).tolist()
            loss = values[0]
            if not math.isfinite(loss):
                bad = "activations" if not bool(torch.isfinite(x).all()) else "loss"
                raise TrainingDivergedError(
                    f"step {self.step + 1}: the {bad} became NaN or Inf (loss={loss}); "
                    f"training stopped and the last good checkpoint in {self.checkpoints} is kept"
                )
            self.scaler.scale(res.loss / cfg.grad_accum).backward()
            counts = firing_counts(res.out.code, sae.n_latents)
            counts = counts[self.offset : self.offset + self.m_local].contiguous()
            self.stats.update(all_sum(counts, layout.data_group), cfg.batch_size)
            if sae.activation == "batchtopk":
                self._track_threshold(res.out.code.values)
            for name, value in zip(names, values, strict=True):
                terms[name] = terms.get(name, 0.0) + value / cfg.grad_accum
        if layout.data > 1:
            for p in sae.parameters():
                if p.grad is not None:
                    all_sum(p.grad, layout.data_group).div_(layout.data)
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            if cfg.normalize_decoder:
                sae.remove_parallel_decoder_grad_()
            self._clip_gradients(cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        sums = reconstruction_sums(target, res.out.x_hat, res.out.code)
        metrics = metrics_from_sums(all_sum(sums, layout.data_group))
        out_scale = self.scale if self.output_scale is None else self.output_scale
        metrics["mse"] /= out_scale**2  # in the units of the raw activations
        return {"lr": lr, **terms, **metrics}

    @torch.no_grad()
    def _clip_gradients(self, max_norm: float) -> None:
        """Scale the gradients to a global norm of at most max_norm (as clip_grad_norm_ does
        for one process): the latent shards' squares summed over the group, b_dec's once."""
        grads = {name: p.grad for name, p in self.sae.named_parameters() if p.grad is not None}
        squares = {name: torch.linalg.vector_norm(g).double() ** 2 for name, g in grads.items()}
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = sum((sq for n, sq in squares.items() if checkpoints.is_row(n, grads[n])), zero)
        whole = sum((sq for n, sq in squares.items() if not checkpoints.is_row(n, grads[n])), zero)
        norm = (all_sum(rows.reshape(1), self.layout.latent_group)[0] + whole).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(coef.to(g.dtype))

    @torch.no_grad()
    def _track_threshold(self, values: Tensor) -> None:
        """EMA of the smallest kept activation: the BatchTopK threshold at inference."""
        positive = values[values > 0]
        if positive.numel() == 0:
            return
        low = positive.min().item()
        prev = self.batchtopk_threshold
        self.batchtopk_threshold = low if prev is None else prev + _BATCHTOPK_EMA * (low - prev)

    # --- the loop ------------------------------------------------------------------------

    def train(self, until: int | None = None) -> TrainResult:
        """Run to cfg.steps (or to step `until`), checkpointing as configured.

        Ctrl-C finishes the step, saves a checkpoint and returns with interrupted=True;
        NaN/Inf raises TrainingDivergedError without saving over the last good checkpoint.
        """
        self.acquire()
        try:
            return self._train(until)
        finally:
            self.close()

    def _train(self, until: int | None) -> TrainResult:
        bar = progress_bar(self.cfg, self.step, self.layout.main)
        with StopOnInterrupt() as interrupt, bar, self.running(until, bar) as loop:
            while self.step < loop.stop and not self._stop_requested(interrupt):
                self.advance(loop)
        return self.finish(loop, self._stop_requested(interrupt))

    @contextmanager
    def running(
        self, until: int | None = None, bar=None, label: str = "", warnings: bool = True
    ) -> Iterator[Loop]:
        """The run's logs opened for the steps to cfg.steps (or to step `until`): the Loop
        that advance() drives to loop.stop and finish() ends. bar: a tqdm bar to update
        (None: the caller shows progress); label starts the printed log lines; warnings:
        say where defaults meant for long runs cannot act (once for runs alike)."""
        cfg, main = self.cfg, self.layout.main
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        if main:
            self._write_run_config()
            if warnings:
                self._warn_about_short_runs()
        log = MetricsLog(self.out_dir / checkpoints.METRICS_FILE)
        if main:
            log.truncate_after(self.step)
        sinks = open_sinks(
            self.out_dir,
            {"train": cfg.to_dict(), "source": self.source.describe()},
            tensorboard=cfg.tensorboard and main,
            wandb=cfg.wandb and main,
            wandb_project=cfg.wandb_project,
            resume_step=self.step or None,
        )
        with sinks:
            yield Loop(stop, log, sinks, bar, label, time.perf_counter(), self.stats.tokens)

    def advance(self, loop: Loop) -> None:
        """One optimizer step of loop, logged and checkpointed as configured."""
        cfg, main = self.cfg, self.layout.main
        row = self._train_step()
        if loop.bar is not None:
            loop.bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == loop.stop:
            now = time.perf_counter()
            row = self._log_row(row, (self.stats.tokens - loop.tokens_at) / (now - loop.started))
            loop.started, loop.tokens_at = now, self.stats.tokens
            if main:
                loop.log.write(row)
                loop.sinks.write(row)
            if not cfg.progress and main:
                print(loop.label + _log_line(row, cfg.steps), flush=True)
            if loop.bar is not None:
                loop.bar.set_postfix(
                    fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=row["dead_fraction"]
                )
        loop.row = row
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def finish(self, loop: Loop, interrupted: bool) -> TrainResult:
        """End loop: the checkpoint of this step, and at cfg.steps the SAE and the plots."""
        cfg, main = self.cfg, self.layout.main
        self.save_checkpoint()
        sae = self.export()
        if self.step == cfg.steps:
            self._save_sae(sae, self.out_dir / checkpoints.SAE_DIR)
            frequencies = self._gather_latents(self.stats.frequencies())
            if cfg.plots and main:
                from .plots import plot_run

                plot_run(self.out_dir, frequencies)
        return TrainResult(sae, self.step, loop.row, self.out_dir, interrupted)

    def _stop_requested(self, interrupt: StopOnInterrupt) -> bool:
        """Whether any rank was interrupted: all stop after the same step."""
        if not self.layout.distributed:
            return interrupt.requested
        flag = torch.tensor([int(interrupt.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _gather_latents(self, t: Tensor) -> Tensor:
        """A (m_r,) per-latent tensor of every shard, whole (m,) on every rank."""
        group = self.layout.latent_group
        if group is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.layout.latent)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)

    def _save_sae(self, sae: SparseAutoencoder, folder: Path) -> None:
        """sae (this rank's shard of it) as one sae_fast folder, written by its shards."""
        if not self.layout.distributed:
            sae.save(folder)
            return
        rows, whole = self._split(sae.state_dict())
        checkpoints.save_sharded_sae(folder, sae.config(), rows, whole, self.layout)

    @staticmethod
    def _split(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the tensors with a row per latent, the others) of a state dict."""
        rows = {n: t for n, t in tensors.items() if checkpoints.is_row(n, t)}
        return rows, {n: t for n, t in tensors.items() if n not in rows}

    def _warn_about_short_runs(self) -> None:
        """Say when defaults meant for long runs cannot act in this one."""
        cfg = self.cfg
        tokens = cfg.steps * cfg.batch_size * cfg.grad_accum
        if cfg.lr_warmup_steps is not None and cfg.lr_warmup_steps >= cfg.steps:
            warn(
                f"lr_warmup_steps={cfg.lr_warmup_steps} >= steps={cfg.steps}: "
                "the learning rate never reaches its peak"
            )
        sparse = self.sae.activation in SPARSE_ACTIVATIONS
        if sparse and self.weights.auxk > 0 and cfg.dead_tokens > tokens:
            warn(
                f"dead_tokens={cfg.dead_tokens:,} is more than this run's "
                f"{tokens:,} tokens: no latent can count as dead, so AuxK never acts and "
                "dead_fraction stays 0 (lower --dead-tokens)"
            )

    def _log_row(self, row: dict, tokens_per_s: float) -> dict:
        summary = self.stats.window_counts(self.cfg.dead_tokens, self.cfg.dense_threshold)
        dead, dense = all_sum(summary, self.layout.latent_group).tolist()
        return {
            "step": self.step,
            "tokens": self.stats.tokens,
            **row,
            "dead_fraction": dead / self.sae.n_latents,
            "dense_fraction": dense / self.sae.n_latents,
            "tokens_per_s": tokens_per_s,
        }

    def _write_run_config(self) -> None:
        body = {
            "train": self.cfg.to_dict(),
            "source": self.source.describe(),
            "d_in": self.sae.d_in,
            "n_latents": self.sae.n_latents,
            "input_scale": self.scale,
            **({"output_scale": self.output_scale} if self.sae.transcoder else {}),
            "layout": self.layout.describe(),
        }
        with atomic_path(self.out_dir / checkpoints.RUN_CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(body, indent=2) + "\n")

    # --- saving and resuming ---------------------------------------------------------------

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
        sae.fold_input_scale_(self.scale, self.output_scale)
        sae.provenance = self.provenance()
        return sae

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
            exported.config(),
            theirs,
            state,
            self.cfg.keep_checkpoints,
        )

    def _save_sharded(
        self, config: dict, ours: dict[str, Tensor], exported: dict[str, Tensor], state: dict
    ) -> Path:
        """The checkpoint as every rank's shard (checkpoints.save_sharded): the tensors
        with a row per latent go to the row shards, train_state.pt keeps the rest."""
        # The training-time values of what exporting may change (fold_input_scale_): all
        # but W_dec, and but W_enc unless a transcoder's two scales rescale it; by name, so
        # every shard stores the same names.
        kept = ("W_dec",) if self.sae.transcoder else ("W_enc", "W_dec")
        named = {f"param.{n}": t for n, t in ours.items() if n not in kept}
        for name, p in self.sae.named_parameters():
            for key, value in self.optimizer.state.get(p, {}).items():
                named[f"adam.{name}.{key}"] = value
        for key in LatentStats.COUNTERS:
            named[f"stats.{key}"] = getattr(self.stats, key)
        state["optimizer_groups"] = self.optimizer.state_dict()["param_groups"]
        state["stats"] = {"tokens": self.stats.tokens, "window_tokens": self.stats.window_tokens}
        # One stream per data rank: its first latent shard's (the one that draws).
        sources = [None] * self.layout.world if self.layout.main else None
        dist.gather_object(state["source"], sources, dst=0)
        state["source"] = sources[:: self.layout.latent] if sources else None
        sae_rows, sae_whole = self._split(exported)
        return checkpoints.save_sharded(
            self.checkpoints,
            self.step,
            (config, sae_rows, sae_whole),
            self._split(named),
            state,
            self.cfg.keep_checkpoints,
            self.layout,
        )

    def _resume(self, resume: bool | str | Path, found: list[Path]) -> None:
        if resume is True:
            if not found:
                raise ConfigError(f"--resume: no checkpoint in {self.checkpoints}")
            folder = found[-1]
        else:
            folder = Path(resume)
        names = [name for name, _ in self.sae.named_parameters()]
        saved = checkpoints.CheckpointState(folder, self.device, names)
        try:
            self._restore(saved, folder)
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a damaged state
            raise CheckpointError(
                f"--resume: checkpoint {folder} is incomplete or damaged ({e!r}); resume from "
                "another one (--resume FOLDER) or start a new run"
            ) from None
        if self.layout.main:
            print(f"sae-fast: resuming {self.out_dir} from step {self.step} (checkpoint {folder})")
            abandon_after(self.out_dir, self.step)
        if self.layout.distributed:
            dist.barrier()

    def _restore(self, saved: checkpoints.CheckpointState, folder: Path) -> None:
        """The run's state as saved: parameters, optimizer, schedule, counters, data
        position, step, scales and random states."""
        state, config = saved.state, saved.config
        self._check_options(state["config"], state["step"], folder)
        if (config["d_in"], config["n_latents"]) != (self.sae.d_in, self.sae.n_latents):
            raise ConfigError(
                f"--resume: checkpoint {folder} has d_in={config['d_in']}, "
                f"n_latents={config['n_latents']}; this run has d_in={self.sae.d_in}, "
                f"n_latents={self.sae.n_latents}"
            )
        self._load_tensors(saved)
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
        rank = self.layout.data_rank if _broadcasts(self.source) else 0
        if rank >= len(saved):
            raise ConfigError(
                f"--resume: checkpoint {folder} holds the data streams of {len(saved)} "
                f"data-parallel ranks; with a model source resume with that many"
            )
        self.source.load_state_dict(saved[rank])

    def _check_options(self, saved: dict, step: int, folder: Path) -> None:
        """Refuse the changed options that shaped the checkpoint; log the others."""
        # An option newer than the checkpoint had its default there.
        was = {f.name: saved.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)}
        changed = [
            (f, was[f.name], getattr(self.cfg, f.name))
            for f in dataclasses.fields(TrainConfig)
            if not self._same_option(f.name, was[f.name], getattr(self.cfg, f.name))
        ]
        refused = [
            f"{f.name}={new!r} (the checkpoint has {old!r})"
            for f, old, new in changed
            if f.metadata["resume"] == REFUSE
        ]
        if refused:
            raise ConfigError(
                f"--resume: checkpoint {folder} was trained with other values of options "
                f"that shape the SAE or its data: {'; '.join(refused)}; resume with the "
                "checkpoint's values, or start a new run"
            )
        if self.cfg.steps < step:
            raise ConfigError(
                f"--resume: steps={self.cfg.steps} is below the checkpoint's step {step}: "
                f"give --steps {step} or more"
            )
        for f, old, new in changed if self.layout.main else ():
            if f.name != "out_dir":
                print(f"sae-fast: resuming with {f.name}={new!r} (the checkpoint had {old!r})")

    def _same_option(self, name: str, old: object, new: object) -> bool:
        """Whether two values of an option mean the same run: equal, or Matryoshka prefix
        sizes that name the same prefixes of this dictionary (16,64 and 16,64,256 of 256)."""
        if old == new:
            return True
        if name == "matryoshka" and isinstance(old, str) and isinstance(new, str):
            m = self.sae.n_latents
            return parse_matryoshka(old, m) == parse_matryoshka(new, m)
        return False

    def _apply_optimizer_options(self) -> None:
        """The optimizer's state holds the checkpoint's lr, betas and eps: use this run's."""
        cfg = self.cfg
        peak = cfg.peak_lr(self.sae.n_latents)
        self.scheduler.base_lrs = [peak for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = peak, peak * lr_factor(self.step, cfg)
            group["betas"], group["eps"] = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps


def occupied(out_dir: Path) -> ConfigError:
    """The refusal of a new run in a folder that already holds checkpoints."""
    return ConfigError(
        f"out_dir {out_dir} already holds checkpoints: resume it (--resume) or choose "
        "another out_dir"
    )


def check_run_folder(out_dir: Path, resume: bool | str, probe_lock: bool = True) -> None:
    """Before anything slow (a model, a cache): a new run's folder holds no checkpoints, and
    (probe_lock) no other run holds its lock. Trainer checks both again, holding the lock."""
    if not resume and checkpoints.list_checkpoints(out_dir / checkpoints.CHECKPOINTS_DIR):
        raise occupied(out_dir)
    if probe_lock and (out_dir / LOCK_FILE).exists():
        with lock_folder(out_dir, RUN_LOCK):
            pass


def abandon_after(out_dir: Path, step: int) -> None:
    """Move the checkpoints of the run in out_dir newer than step (and the SAE exported from
    them) aside, to checkpoints/abandoned-TIME-PID/, with a copy of the metrics log."""
    root = out_dir / checkpoints.CHECKPOINTS_DIR
    last = checkpoints.folder_name(step)
    newer = [p for p in checkpoints.list_checkpoints(root) if p.name > last]
    if not newer:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside = root / f"abandoned-{stamp}-{os.getpid()}"
    aside.mkdir()
    exported = out_dir / checkpoints.SAE_DIR
    for path in [*newer, *([exported] if exported.exists() else [])]:
        os.rename(path, aside / path.name)
    log = out_dir / checkpoints.METRICS_FILE
    if log.exists():  # its rows past step go with the branch (the run's log is cut back)
        shutil.copy2(log, aside / log.name)
    print(
        f"sae-fast: resumed from step {step}; moved the newer {[p.name for p in newer]} of "
        f"the abandoned branch to {aside}"
    )


def parameter_bytes(n_latents: int, width: int, dtype: torch.dtype, moments: str = "param") -> int:
    """What training n_latents latents holds: W_enc's and W_dec's rows (width: d_in + d_out
    together), their gradients and Adam's two moments (stored as optimizer.SaeAdam does)."""
    moment = moment_dtype(moments, dtype).itemsize
    return n_latents * width * 2 * (dtype.itemsize + moment)


def _norm_scale(x: Tensor) -> float:
    """The factor that makes x's (n, d) mean row norm sqrt(d)."""
    mean_norm = x.float().norm(dim=1).mean().item()
    if mean_norm == 0:
        raise ConfigError("normalize_input: the activations are all zero")
    return math.sqrt(x.shape[1]) / mean_norm


def _broadcasts(source: ActivationSource) -> bool:
    """Whether source's rows are drawn by one rank and broadcast (ActivationSource); a
    source that does not say shares one stream."""
    return getattr(source, "broadcast_rows", False)


def warn(message: str) -> None:
    """A warning about the run, on stderr as the command line's are."""
    print(f"sae-fast: warning: {message}", file=sys.stderr)


def _log_line(row: dict, steps: int) -> str:
    """One line of a logged row, for runs without a progress bar."""
    return (
        f"step {row['step']}/{steps}  fvu {row['fvu']:.4f}  l0 {row['l0']:.1f}  "
        f"dead {row['dead_fraction']:.3f}  loss {row['loss']:.4g}  lr {row['lr']:.3g}  "
        f"{row['tokens_per_s']:,.0f} tokens/s"
    )


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) asks the loop to stop after the current step.

    Stopping between steps keeps model, optimizer and data position consistent for the
    checkpoint written at exit; a second Ctrl-C interrupts at once. Outside the main thread
    signals cannot be caught and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nsae-fast: stopping after this step and saving a checkpoint (Ctrl-C again aborts)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def progress_bar(cfg: TrainConfig, initial: int, main: bool):
    """The tqdm bar of a run at step initial, shown when cfg.progress on the main process."""
    from tqdm.auto import tqdm

    shown = cfg.progress and main
    return tqdm(total=cfg.steps, initial=initial, disable=not shown, unit="step")


def train(cfg: TrainConfig, source: ActivationSource, resume: bool | str | Path = False):
    """Build a Trainer and run it to the end; returns its TrainResult."""
    return Trainer(cfg, source, resume).train()
