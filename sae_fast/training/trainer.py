"""The trainer: an SAE fitted to a stream of activations, with checkpoints that resume exactly.

One optimizer step draws grad_accum micro-batches of batch_size activations from the source,
computes the activation's loss (losses.py), removes the decoder gradient parallel to each row,
takes a (fused) Adam step and renormalises the decoder. A checkpoint holds everything the next
step depends on, so N steps, a stop and N resumed steps give the weights of 2N straight steps.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from ..files import atomic_path, clean_stale, lock_folder
from ..options import SPARSE_ACTIVATIONS
from ..sae import SparseAutoencoder
from ..sources.base import ActivationSource
from ..validation import check_fits, parse_dtype
from ..version import VERSION
from . import checkpoints
from .config import REFUSE, ConfigError, TrainConfig, resolve_device
from .loggers import open_sinks
from .losses import LossWeights, training_loss
from .metrics import LatentStats, MetricsLog, firing_counts, reconstruction_metrics

_BATCHTOPK_EMA = 0.01  # threshold estimate update rate (Bussmann et al. 2024)


class TrainingDivergedError(RuntimeError):
    """Loss or activations became NaN/Inf; the last good checkpoint is kept."""


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
    """

    def __init__(
        self, cfg: TrainConfig, source: ActivationSource, resume: bool | str | Path = False
    ) -> None:
        self.cfg, self.source = cfg, source
        self.out_dir = Path(cfg.out_dir)
        self.checkpoints = self.out_dir / checkpoints.CHECKPOINTS_DIR
        self.device = resolve_device(cfg.device)
        self.dtype = parse_dtype(cfg.dtype)
        d_in = source.d_in
        m = cfg.latents(d_in)
        # Parameters, their gradients and Adam's two moments: four copies of W_enc and W_dec;
        # a batch's rows and, for the dense activations, its (batch, m) latents.
        size = self.dtype.itemsize
        sparse = cfg.activation in SPARSE_ACTIVATIONS
        dense = 0 if sparse else 4 * cfg.batch_size * m
        for nbytes, what in [
            (8 * m * d_in * size, f"n_latents={m} x d_in={d_in} ({cfg.dtype}, with Adam)"),
            (4 * max(cfg.batch_size, cfg.init_tokens) * d_in * size + dense * size,
             f"batch_size={cfg.batch_size} / init_tokens={cfg.init_tokens} x d_in={d_in}"),
        ]:  # fmt: skip
            check_fits(nbytes, what, self.device, ConfigError)
        k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_in // 2)
        if sparse and cfg.k > m:
            raise ConfigError(f"k={cfg.k} is larger than the dictionary (n_latents={m})")
        self.weights = LossWeights(
            auxk=cfg.auxk_coef, k_aux=min(k_aux, m), l1=cfg.l1_coef, l0=cfg.l0_coef
        )
        torch.manual_seed(cfg.seed)
        self.sae = SparseAutoencoder(
            d_in,
            m,
            k=cfg.k if sparse else None,
            activation=cfg.activation,
            dtype=self.dtype,
            device=self.device,
            backend=cfg.backend,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        )
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(),
            lr=cfg.peak_lr(m),
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg)
        )
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast]
        self.amp_dtype = amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.stats = LatentStats(m, self.device)
        self.step = 0
        self.scale = 1.0
        self.batchtopk_threshold: float | None = None
        self._lock = None
        self._acquire()
        try:
            for folder in (self.out_dir, self.checkpoints):
                clean_stale(folder)
            if resume:
                self._resume(resume)
            elif checkpoints.list_checkpoints(self.checkpoints):
                raise ConfigError(
                    f"out_dir {self.out_dir} already holds checkpoints: resume it (--resume) "
                    "or choose another out_dir"
                )
            else:
                self._initialise()
        except BaseException:
            self.close()
            raise

    # --- setup -------------------------------------------------------------------------

    def _acquire(self) -> None:
        if self._lock is None:
            self._lock = lock_folder(self.out_dir, "sae-fast training run")
            self._lock.__enter__()

    def close(self) -> None:
        """Release out_dir (train() does at its end; a later train() takes it again)."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def _batch(self, n: int) -> Tensor:
        x = self.source.next_batch(n).to(self.device, self.dtype)
        return x * self.scale if self.scale != 1.0 else x

    @torch.no_grad()
    def _initialise(self) -> None:
        """Input scale and b_dec from the first init_tokens activations."""
        sample = self._batch(self.cfg.init_tokens)
        if not bool(torch.isfinite(sample).all()):
            raise TrainingDivergedError("the first activations drawn hold NaN or Inf")
        if self.cfg.normalize_input:
            mean_norm = sample.float().norm(dim=1).mean().item()
            if mean_norm == 0:
                raise ConfigError("normalize_input: the activations are all zero")
            self.scale = math.sqrt(self.sae.d_in) / mean_norm
            sample = sample * self.scale
        if self.cfg.b_dec_init != "zeros":
            self.sae.set_b_dec_from_data(sample, method=self.cfg.b_dec_init)

    # --- the step ------------------------------------------------------------------------

    def _sparsity_scale(self) -> float:
        warmup = self.cfg.sparsity_warmup_steps
        return min(1.0, (self.step + 1) / warmup) if warmup else 1.0

    def _train_step(self) -> dict[str, float]:
        cfg, sae = self.cfg, self.sae
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            x = self._batch(cfg.batch_size)
            dead = self.stats.dead_mask(cfg.dead_tokens)
            amp = self.amp_dtype is not None
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
                res = training_loss(sae, x, self.weights, dead, self._sparsity_scale())
            loss = res.loss.item()
            if not math.isfinite(loss):
                bad = "activations" if not bool(torch.isfinite(x).all()) else "loss"
                raise TrainingDivergedError(
                    f"step {self.step + 1}: the {bad} became NaN or Inf (loss={loss}); "
                    f"training stopped and the last good checkpoint in {self.checkpoints} is kept"
                )
            self.scaler.scale(res.loss / cfg.grad_accum).backward()
            self.stats.update(firing_counts(res.out.code, sae.n_latents), x.shape[0])
            if sae.activation == "batchtopk":
                self._track_threshold(res.out.code.values)
            terms["loss"] = terms.get("loss", 0.0) + loss / cfg.grad_accum
            for name, value in res.terms.items():
                terms[name] = terms.get(name, 0.0) + value.item() / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        if cfg.normalize_decoder:
            sae.remove_parallel_decoder_grad_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if cfg.normalize_decoder:
            sae.normalize_decoder_()
        self.step += 1
        metrics = reconstruction_metrics(x, res.out.x_hat, res.out.code)
        metrics["mse"] /= self.scale**2  # in the units of the raw activations
        return {"lr": lr, **terms, **metrics}

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
        self._acquire()
        try:
            return self._train(until)
        finally:
            self.close()

    def _train(self, until: int | None) -> TrainResult:
        cfg = self.cfg
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        self._write_run_config()
        self._warn_about_short_runs()
        log = MetricsLog(self.out_dir / checkpoints.METRICS_FILE)
        log.truncate_after(self.step)
        sinks = open_sinks(
            self.out_dir,
            {"train": cfg.to_dict(), "source": self.source.describe()},
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            resume_step=self.step or None,
        )
        bar = _progress(cfg, self.step)
        row: dict = {}
        started, tokens_at = time.perf_counter(), self.stats.tokens
        with _StopOnInterrupt() as interrupt, bar, sinks:
            while self.step < stop and not interrupt.requested:
                row = self._train_step()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == stop:
                    now = time.perf_counter()
                    row = self._log_row(row, (self.stats.tokens - tokens_at) / (now - started))
                    started, tokens_at = now, self.stats.tokens
                    log.write(row)
                    sinks.write(row)
                    if not cfg.progress:
                        print(_log_line(row, cfg.steps), flush=True)
                    bar.set_postfix(
                        fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=row["dead_fraction"]
                    )
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        interrupted = interrupt.requested
        self.save_checkpoint()
        sae = self.export()
        if self.step == cfg.steps:
            sae.save(self.out_dir / checkpoints.SAE_DIR)
            if cfg.plots:
                from .plots import plot_run

                plot_run(self.out_dir, self.stats.frequencies())
        return TrainResult(sae, self.step, row, self.out_dir, interrupted)

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
        return {
            "step": self.step,
            "tokens": self.stats.tokens,
            **row,
            **self.stats.window_summary(self.cfg.dead_tokens, self.cfg.dense_threshold),
            "tokens_per_s": tokens_per_s,
        }

    def _write_run_config(self) -> None:
        body = {
            "train": self.cfg.to_dict(),
            "source": self.source.describe(),
            "d_in": self.sae.d_in,
            "n_latents": self.sae.n_latents,
            "input_scale": self.scale,
        }
        with atomic_path(self.out_dir / checkpoints.RUN_CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(body, indent=2) + "\n")

    # --- saving and resuming ---------------------------------------------------------------

    def provenance(self) -> dict:
        """What the SAE was trained on, for its cfg.json (sae_config.PROVENANCE_KEYS)."""
        described = self.source.describe()
        found = {
            "model": described.get("model"),
            "hook": described.get("hook"),
            "text": described.get("text"),
            "tokens": self.stats.tokens,
            "step": self.step,
            "sae_fast_version": VERSION,
            "source": described,
            "train": self.cfg.to_dict(),
        }
        return {key: value for key, value in found.items() if value is not None}

    def export(self) -> SparseAutoencoder:
        """A copy of the SAE for raw activations: input scale folded in, threshold set,
        provenance recorded."""
        sae = copy.deepcopy(self.sae).eval()
        if sae.activation == "batchtopk" and self.batchtopk_threshold is not None:
            sae.threshold.fill_(self.batchtopk_threshold)
        sae.fold_input_scale_(self.scale)
        sae.provenance = self.provenance()
        return sae

    def _state(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "stats": self.stats.state_dict(),
            "scale": self.scale,
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

    def _resume(self, resume: bool | str | Path) -> None:
        if resume is True:
            found = checkpoints.list_checkpoints(self.checkpoints)
            if not found:
                raise ConfigError(f"--resume: no checkpoint in {self.checkpoints}")
            folder = found[-1]
        else:
            folder = Path(resume)
        config, tensors, state = checkpoints.load(folder, self.device)
        self._check_options(state["config"], state["step"], folder)
        if (config["d_in"], config["n_latents"]) != (self.sae.d_in, self.sae.n_latents):
            raise ConfigError(
                f"--resume: checkpoint {folder} has d_in={config['d_in']}, "
                f"n_latents={config['n_latents']}; this run has d_in={self.sae.d_in}, "
                f"n_latents={self.sae.n_latents}"
            )
        # Before train_tensors existed, a checkpoint's SAE was the training-time one.
        self.sae.load_state_dict({**tensors, **state.get("train_tensors", {})})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # fp16 on both sides of the resume
            self.scaler.load_state_dict(state["scaler"])
        self.stats.load_state_dict(state["stats"])
        self.source.load_state_dict(state["source"])
        self.step, self.scale = state["step"], state["scale"]
        self.batchtopk_threshold = state["batchtopk_threshold"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self._apply_optimizer_options()
        self._abandon_after(self.step)

    def _check_options(self, saved: dict, step: int, folder: Path) -> None:
        """Refuse the changed options that shaped the checkpoint; log the others."""
        changed = [
            (f, saved[f.name], getattr(self.cfg, f.name))
            for f in dataclasses.fields(TrainConfig)
            if f.name in saved and saved[f.name] != getattr(self.cfg, f.name)
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
        for f, old, new in changed:
            if f.name != "out_dir":
                print(f"sae-fast: resuming with {f.name}={new!r} (the checkpoint had {old!r})")

    def _apply_optimizer_options(self) -> None:
        """The optimizer's state holds the checkpoint's lr, betas and eps: use this run's."""
        cfg = self.cfg
        peak = cfg.peak_lr(self.sae.n_latents)
        self.scheduler.base_lrs = [peak for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = peak, peak * lr_factor(self.step, cfg)
            group["betas"], group["eps"] = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps

    def _abandon_after(self, step: int) -> None:
        """Move the checkpoints newer than step (and the SAE exported from them) aside."""
        last = checkpoints.folder_name(step)
        newer = [p for p in checkpoints.list_checkpoints(self.checkpoints) if p.name > last]
        if not newer:
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = self.checkpoints / f"abandoned-{stamp}-{os.getpid()}"
        aside.mkdir()
        exported = self.out_dir / checkpoints.SAE_DIR
        for path in [*newer, *([exported] if exported.exists() else [])]:
            os.rename(path, aside / path.name)
        log = self.out_dir / checkpoints.METRICS_FILE
        if log.exists():  # its rows past step go with the branch (the run's log is cut back)
            shutil.copy2(log, aside / log.name)
        print(
            f"sae-fast: resumed from step {step}; moved the newer {[p.name for p in newer]} of "
            f"the abandoned branch to {aside}"
        )


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


class _StopOnInterrupt:
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

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def _progress(cfg: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, disable=not cfg.progress, unit="step")


def train(cfg: TrainConfig, source: ActivationSource, resume: bool | str | Path = False):
    """Build a Trainer and run it to the end; returns its TrainResult."""
    return Trainer(cfg, source, resume).train()
