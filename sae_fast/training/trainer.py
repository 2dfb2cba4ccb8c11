"""The trainer: an SAE fitted to a stream of activations, with checkpoints that resume exactly.

One optimizer step draws grad_accum micro-batches of batch_size activations from the source,
computes the activation's loss (losses.py) and takes one Adam step that also removes the
decoder gradient parallel to each row and renormalises the decoder (optimizer.py). A
checkpoint holds everything the next step depends on, so N steps, a stop and N resumed steps
give the weights of 2N straight steps. The run folder's life (lock, resume, options on
resume, abandoned branches) is run_folder.py's; what a checkpoint holds and how the trainer
returns to it, run_state.py's; the loop's logs, bar and Ctrl-C, loop.py's.

Under torchrun the same loop runs on every process of a Layout (parallel/layout.py): each data rank
trains on its slice of the global batch and the data group averages the gradients; each
latent shard holds its block of the latents (ShardedSparseAutoencoder: exact sharded ops).
The losses, metrics and latent counters are the global batch's, so any layout trains the
weights one process would, up to the order of floating-point sums. Rank 0 logs and writes
the run's files; every rank of data rank 0 writes its shard of the checkpoints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..files import atomic_path
from ..options import AUTOCAST_DTYPES, SPARSE_ACTIVATIONS
from ..parallel.layout import Layout, all_sum, broadcast_first, local_device
from ..parallel.sae import ShardedSparseAutoencoder
from ..sae import SparseAutoencoder
from ..sources.base import ActivationSource, broadcasts, part_rows
from ..validation import check_fits, parse_dtype
from . import checkpoints
from .config import ConfigError, TrainConfig, resolve_device
from .loggers import open_sinks
from .loop import Loop, StopOnInterrupt, log_line, progress_bar
from .losses import LossWeights, StepOutput, training_loss
from .metrics import LatentStats, MetricsLog, firing_counts, metrics_from_sums, reconstruction_sums
from .optimizer import SaeAdam, lr_factor, moment_dtype
from .run_folder import RunFolder
from .run_state import Checkpointing

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


class Trainer(Checkpointing):
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
        self.folder = RunFolder(self.out_dir, layout)
        self.checkpoints = self.folder.checkpoints
        self.device = resolve_device(local_device(cfg.device))
        self.dtype = parse_dtype(cfg.dtype)
        self.scale: float | list[float] = 1.0  # a CLT's per layer, a crosscoder's per source
        self.output_scale: float | list[float] | None = None  # a transcoder's target's
        self.batchtopk_threshold: float | list[float] | None = None
        self._build()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg)
        )
        self.amp_dtype = amp = parse_dtype(AUTOCAST_DTYPES[cfg.autocast])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.step = 0
        self.acquire()
        try:
            start = self.folder.start(resume)
            if start is None:
                self._initialise()
            else:
                self._resume(start)
        except BaseException:
            self.close()
            raise

    # --- setup -------------------------------------------------------------------------

    def _build(self) -> None:
        """The SAE (this rank's shard of it), its loss weights, optimizer and latent counters."""
        cfg, layout, source = self.cfg, self.layout, self.source
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
        norm = cfg.normalize_decoder
        self.optimizer = self._adam(m, project=norm and not cfg.grad_clip, renormalise=norm)
        self.stats = LatentStats(self.m_local, self.device)

    def _adam(self, m: int, project: bool, renormalise: bool) -> SaeAdam:
        """The optimizer of self.sae, a dictionary of m latents (per layer), as cfg says."""
        cfg = self.cfg
        return SaeAdam(
            self.sae,
            lr=cfg.peak_lr(m),
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            project=project,
            renormalise=renormalise,
            moments=cfg.adam_moments,
        )

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
        self.folder.acquire()

    def close(self) -> None:
        """Release out_dir (train() does at its end; a later train() takes it again)."""
        self.folder.close()

    def _batch(self, n: int, whole: bool = False) -> Tensor:
        """This rank's rows of the next global batch of n (whole: all n, on every rank), as
        the source gives them (a transcoder's: input and output side by side)."""
        layout, source = self.layout, self.source
        part = (layout.data_rank, layout.data)
        if not layout.distributed:  # any source, part or not
            x = source.next_batch(n).to(self.device, self.dtype)
        elif not broadcasts(source):  # the same stream on every rank: each keeps its rows
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
            self._set_scales(rows)
        _, target = self._inputs(rows)
        if self.cfg.b_dec_init != "zeros":
            self._set_b_dec(target)

    def _set_b_dec(self, target: Tensor) -> None:
        """b_dec from a sample of what the model outputs (scaled as it trains)."""
        self.sae.set_b_dec_from_data(target, method=self.cfg.b_dec_init)

    def _set_scales(self, rows: Tensor) -> None:
        """The input scale (a transcoder's: and its output's) from the first rows drawn."""
        x, target = self.sae.split_rows(rows)
        self.scale = norm_scale(x)
        if self.sae.transcoder:
            self.output_scale = norm_scale(target)

    # --- the step ------------------------------------------------------------------------

    def _sparsity_scale(self) -> float:
        warmup = self.cfg.sparsity_warmup_steps
        return min(1.0, (self.step + 1) / warmup) if warmup else 1.0

    def _loss(self, x: Tensor, target: Tensor) -> StepOutput:
        """The loss of a micro-batch x with its target, as the trainer's model defines it."""
        dead = self.stats.dead_mask(self.cfg.dead_tokens)
        return training_loss(self.sae, x, self.weights, dead, self._sparsity_scale(), target)

    def _count(self, res: StepOutput) -> None:
        """The latent counters (and BatchTopK's threshold) after a micro-batch's code."""
        counts = firing_counts(res.out.code, self.sae.n_latents)
        counts = counts[self.offset : self.offset + self.m_local].contiguous()
        self.stats.update(all_sum(counts, self.layout.data_group), self.cfg.batch_size)
        if self.sae.activation == "batchtopk":
            self.batchtopk_threshold = track_threshold(
                self.batchtopk_threshold, res.out.code.values
            )

    def _metrics(self, target: Tensor, res: StepOutput) -> dict[str, float]:
        """The global batch's mse (raw units), fvu and l0 from the last micro-batch."""
        sums = reconstruction_sums(target, res.out.x_hat, res.out.code)
        metrics = metrics_from_sums(all_sum(sums, self.layout.data_group))
        out_scale = self.scale if self.output_scale is None else self.output_scale
        metrics["mse"] /= out_scale**2  # in the units of the raw activations
        return metrics

    def _global_sums(self, parts: list[Tensor]) -> list[Tensor]:
        """Each part's reconstruction_sums of this rank's rows, summed over the data ranks."""
        summed = all_sum(torch.cat(parts), self.layout.data_group)
        return list(summed.split([len(part) for part in parts]))

    def _train_step(self) -> dict[str, float]:
        cfg, sae, layout = self.cfg, self.sae, self.layout
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            x, target = self._inputs(self._batch(cfg.batch_size))
            amp = self.amp_dtype is not None
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
                res = self._loss(x, target)
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
            self._count(res)
            for name, value in zip(names, values, strict=True):
                terms[name] = terms.get(name, 0.0) + value / cfg.grad_accum
        if layout.data > 1:
            for p in sae.parameters():
                if p.grad is not None:
                    all_sum(p.grad, layout.data_group).div_(layout.data)
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            if self.optimizer.renormalise:  # (a CLT's decoders are free)
                sae.remove_parallel_decoder_grad_()
            self._clip_gradients(cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return {"lr": lr, **terms, **self._metrics(target, res)}

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
                print(loop.label + log_line(row, cfg.steps), flush=True)
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
            self.save_sae(sae, self.out_dir / checkpoints.SAE_DIR)
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
        counted = self.stats.total.numel() * self.layout.latent  # a CLT's: every layer's
        return {
            "step": self.step,
            "tokens": self.stats.tokens,
            **row,
            "dead_fraction": dead / counted,
            "dense_fraction": dense / counted,
            "tokens_per_s": tokens_per_s,
        }

    def _run_facts(self) -> dict:
        """What config.json records of the model trained: its widths and input scales."""
        return {
            "d_in": self.sae.d_in,
            "n_latents": self.sae.n_latents,
            "input_scale": self.scale,
            **({"output_scale": self.output_scale} if self.sae.transcoder else {}),
        }

    def _write_run_config(self) -> None:
        body = {
            "train": self.cfg.to_dict(),
            "source": self.source.describe(),
            **self._run_facts(),
            "layout": self.layout.describe(),
        }
        with atomic_path(self.out_dir / checkpoints.RUN_CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(body, indent=2) + "\n")


def parameter_bytes(n_latents: int, width: int, dtype: torch.dtype, moments: str = "param") -> int:
    """What training n_latents latents holds: W_enc's and W_dec's rows (width: d_in + d_out
    together), their gradients and Adam's two moments (stored as optimizer.SaeAdam does)."""
    moment = moment_dtype(moments, dtype).itemsize
    return n_latents * width * 2 * (dtype.itemsize + moment)


@torch.no_grad()
def track_threshold(threshold: float | None, values: Tensor) -> float | None:
    """BatchTopK's threshold at inference: the EMA of the smallest positive value of values
    (a batch's kept activations); threshold: the estimate so far (None: none yet)."""
    positive = values[values > 0]
    if positive.numel() == 0:
        return threshold
    low = positive.min().item()
    return low if threshold is None else threshold + _BATCHTOPK_EMA * (low - threshold)


def norm_scale(x: Tensor) -> float:
    """The factor that makes x's (n, d) mean row norm sqrt(d)."""
    mean_norm = x.float().norm(dim=1).mean().item()
    if mean_norm == 0:
        raise ConfigError("normalize_input: the activations are all zero")
    return math.sqrt(x.shape[1]) / mean_norm


def warn(message: str) -> None:
    """A warning about the run, on stderr as the command line's are."""
    print(f"sae-fast: warning: {message}", file=sys.stderr)


def train(cfg: TrainConfig, source: ActivationSource, resume: bool | str | Path = False):
    """Build a Trainer and run it to the end; returns its TrainResult."""
    return Trainer(cfg, source, resume).train()
