"""`sae-fast report RUN`: the demo's report.html (summary, training curves, firing-frequency
histogram, feature cards with their top contexts) for any training run folder.

The run folder is what the trainer writes: config.json (the options, the source's
description, d_in, n_latents, input scale), metrics.jsonl, the final SAE in sae/ and the
checkpoints in checkpoints/step-N. A finished run is reported with its final SAE; a run that
stopped early with its newest checkpoint, and the report says which one (and its step).
Feature cards need a model: a run on model activations (or on a cache that records its
model and hook point) loads that model and collects the top contexts over the run's text or
another; a synthetic run shows, in their place, how well the SAE recovered the true features.

feature_cards and write_html_report are also how `sae-fast demo` builds its report.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from torch import Tensor, nn

from ..analysis.evaluate import evaluate_with_frequencies
from ..analysis.features import collect_activations, context, pick_features
from ..analysis.html_report import FeatureCard, write_report
from ..checkpoint import CheckpointError
from ..files import read_json
from ..sae import SparseAutoencoder
from ..sources import SourceError, build_source, feature_recovery, load_model
from ..training.checkpoints import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SAE_DIR,
    list_checkpoints,
)
from ..training.config import ConfigError, TrainConfig, check_device, resolve_device
from ..training.metrics import read_jsonl
from ..training.plots import firing_histogram, training_curves
from ..validation import check_int, parse_dtype

REPORT_FILE = "report.html"
DASHBOARD_DIR = "dashboard"  # the demo's feature dashboard, which the report links to
# The PNGs the trainer writes beside its final SAE (training.plots.plot_run).
CURVES_PNG = "training_curves.png"
HISTOGRAM_PNG = "firing_frequency.png"
CONTEXTS_PER_CARD = 6
_RUN_KEYS = ("train", "source", "d_in", "n_latents", "input_scale")
_LAST_METRICS = ("fvu", "mse", "l0", "dead_fraction")


@dataclass
class Run:
    """A training run folder as the report reads it.

    sae_path: the final SAE (folder/sae) or, when the run has none that is current, its newest
    checkpoint; step: the optimizer step of that SAE; final: whether it is the final SAE.
    """

    folder: Path
    train: TrainConfig
    source: dict
    d_in: int
    n_latents: int
    input_scale: float
    metrics: list[dict]
    sae_path: Path
    step: int
    final: bool


def read_run(run_dir: str | Path) -> Run:
    """Read config.json, metrics.jsonl and find the SAE to report; CheckpointError (or
    ConfigError for a bad option in config.json) says what is missing or malformed."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise CheckpointError(f"run folder {folder} does not exist")
    path = folder / RUN_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a training run folder: it has no {RUN_CONFIG_FILE} "
            "(the trainer writes one when a run starts)"
        )
    body = read_json(path, CheckpointError)
    missing = [key for key in _RUN_KEYS if not isinstance(body, dict) or key not in body]
    if missing:
        raise CheckpointError(f"{path} is not a run config: it lacks {missing}")
    if not isinstance(body["train"], dict) or not isinstance(body["source"], dict):
        raise CheckpointError(f'{path}: "train" and "source" must be tables')
    # Options this sae_fast does not know (a newer or older run) are left out, not refused.
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in body["train"].items() if k in known}
    train = TrainConfig.from_dict(options, where=str(path))
    sae_path, step, final = _pick_sae(folder, train.steps)
    metrics_path = folder / METRICS_FILE
    rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]
    return Run(
        folder,
        train,
        body["source"],
        body["d_in"],
        body["n_latents"],
        body["input_scale"],
        [r for r in rows if r["step"] <= step],
        sae_path,
        step,
        final,
    )


def _pick_sae(folder: Path, steps: int) -> tuple[Path, int, bool]:
    """(path, step, final): sae/ when the run finished, else the newest checkpoint.

    The trainer checkpoints its last step, so a newest checkpoint at another step than the
    run's configured steps means sae/ (if any) is from an earlier end of a run since resumed.
    """
    found = list_checkpoints(folder / CHECKPOINTS_DIR)
    newest = int(found[-1].name.removeprefix("step-")) if found else None
    if (folder / SAE_DIR).is_dir() and newest in (None, steps):
        return folder / SAE_DIR, steps, True
    if newest is None:
        raise CheckpointError(
            f"run folder {folder} holds neither a final SAE ({SAE_DIR}/) nor a checkpoint in "
            f"{CHECKPOINTS_DIR}/: it stopped before its first checkpoint"
        )
    return found[-1], newest, False


def load_run_sae(run: Run, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """The run's SAE (for raw activations) on device, checked against config.json."""
    sae = SparseAutoencoder.load(run.sae_path, device=device)
    if (sae.d_in, sae.n_latents) != (run.d_in, run.n_latents):
        raise CheckpointError(
            f"{run.sae_path} holds an SAE with d_in={sae.d_in}, n_latents={sae.n_latents} but "
            f"{run.folder / RUN_CONFIG_FILE} says d_in={run.d_in}, n_latents={run.n_latents}"
        )
    return sae


def feature_cards(
    sae: SparseAutoencoder,
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    text: str,
    *,
    context_size: int,
    tokens: int,
    n_features: int,
    batch_size: int = 32,
    progress: Any = None,
) -> tuple[list[FeatureCard], Tensor, int]:
    """(cards, frequencies (m,), tokens seen): the SAE's latents on about `tokens` tokens of
    text at the model's hook point; n_features latents spread over the firing-frequency range,
    each with its top contexts. progress: a tqdm-like bar updated by tokens, or None."""
    acts = collect_activations(
        sae,
        model,
        tokenizer,
        hook,
        text,
        context_size,
        max_windows=None,
        batch_size=batch_size,
        max_tokens=tokens,
        progress=progress,
    )
    freq = acts.frequencies(sae.n_latents)
    cards = [
        FeatureCard(
            latent,
            freq[latent].item(),
            [
                (value, *context(tokenizer, acts.windows[window], position))
                for value, window, position in acts.top(latent, CONTEXTS_PER_CARD)
            ],
        )
        for latent in pick_features(freq, n_features)
    ]
    return cards, freq, acts.n_tokens


def write_html_report(
    run_dir: str | Path,
    out: str | Path,
    title: str,
    summary: dict,
    cards: list[FeatureCard],
    frequencies: Tensor | None = None,
    *,
    run_plots: bool = True,
    metrics: list[dict] | None = None,
    corpus: str = "held-out tokens",
    notes: list[str] | tuple[str, ...] = (),
    dashboard: str | None = None,
) -> Path:
    """Write report.html at out for the run in run_dir; returns out. dashboard: a feature
    dashboard folder relative to out for the report to link to.

    Plots: the run's own PNGs when run_plots and they exist (the trainer writes them with
    the final SAE), else the curves drawn from metrics (default: run_dir's metrics.jsonl) and
    the histogram drawn from frequencies; a plot with nothing to draw from is left out.
    """
    run_dir = Path(run_dir)
    if metrics is None:
        path = run_dir / METRICS_FILE
        metrics = read_jsonl(path) if path.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        if run_plots and (run_dir / CURVES_PNG).is_file():
            images.append(run_dir / CURVES_PNG)
        elif metrics:
            images.append(training_curves(metrics, Path(tmp) / CURVES_PNG, run_dir.name))
        if run_plots and (run_dir / HISTOGRAM_PNG).is_file():
            images.append(run_dir / HISTOGRAM_PNG)
        elif frequencies is not None:
            images.append(firing_histogram(frequencies, Path(tmp) / HISTOGRAM_PNG, run_dir.name))
        return write_report(
            out, title, summary, images, cards, corpus=corpus, notes=notes, dashboard=dashboard
        )


@dataclass
class _ModelSpec:
    """The model a run's activations came from, as config.json records it."""

    name: str
    hook: str
    context_size: int
    text: str | None
    dtype: str | None


def _model_spec(run: Run) -> _ModelSpec | None:
    src, train = run.source, run.train
    if src.get("kind") == "model":  # the options keep the name or folder as given
        # A transcoder's latents read its input hook point.
        name, hook = train.model or src.get("model"), train.hook or train.hook_in or src.get("hook")
        size = src.get("context_size", train.context_size)
        return _ModelSpec(name, hook, size, train.text, train.model_dtype)
    if src.get("kind") == "cache" and src.get("model") and src.get("hook"):
        size = src.get("context_size", train.context_size)
        return _ModelSpec(src["model"], src["hook"], size, src.get("text"), None)
    return None


def _load_model(spec: _ModelSpec, run: Run, device: torch.device) -> tuple[nn.Module, Any]:
    dtype = parse_dtype(spec.dtype) if spec.dtype else None
    try:
        return load_model(spec.name, device, dtype)
    except (OSError, ValueError) as e:  # transformers: not found, not a model, no network
        raise SourceError(
            f"cannot load the model {spec.name!r} that {run.folder / RUN_CONFIG_FILE} records "
            f"for this run: {e}"
        ) from e


def _source_rows(run: Run) -> dict:
    src, train = run.source, run.train
    kind = src.get("kind", "unknown")
    if kind == "model":
        hooks = {"hook_in": train.hook_in, "hook_out": train.hook_out} if train.hook_in else {}
        return {
            "source": kind,
            "model": train.model,
            "hook": train.hook,
            **hooks,
            "text": train.text,
        }
    if kind == "cache":
        rows = {"source": kind, "cache": src.get("path", train.cache_dir)}
        return rows | {key: src[key] for key in ("model", "hook", "text") if key in src}
    if kind == "synthetic":
        keys = ("synthetic_d", "synthetic_features", "synthetic_active", "synthetic_noise")
        return {"source": kind, **{key: getattr(train, key) for key in keys}}
    return {"source": kind}


def run_summary(run: Run, sae: SparseAutoencoder) -> dict:
    """The summary table of a run: which SAE, its shape, the source, the last logged metrics."""
    where = f"{SAE_DIR}/ (final)"
    if not run.final:
        where = f"{CHECKPOINTS_DIR}/{run.sae_path.name} (newest checkpoint: no final SAE yet)"
    rows = {
        "run": str(run.folder),
        "sae": where,
        "step": run.step,
        "steps": run.train.steps,
        **_source_rows(run),
        "activation": sae.activation,
        **({"k": sae.k} if sae.k is not None else {}),
        "d_in": sae.d_in,
        "n_latents": sae.n_latents,
        "train_tokens": run.step * run.train.batch_size * run.train.grad_accum,
        "input_scale": run.input_scale,
    }
    if run.metrics:
        last = run.metrics[-1]
        rows |= {f"train_{key}": last[key] for key in _LAST_METRICS if key in last}
    return rows


def write_run_report(
    run_dir: str | Path,
    *,
    text: str | None = None,
    tokens: int = 32768,
    n_features: int = 8,
    device: str = "cpu",
    out: str | Path | None = None,
) -> Path:
    """Write report.html for the training run in run_dir; returns its path.

    text: the documents the feature contexts come from ('stdlib', a .txt or .jsonl file;
    default: the run's own text); only runs on model activations, or on a cache that records
    its model and hook point, have a model to run it through. tokens: tokens of text for the
    contexts and firing frequencies (synthetic runs: held-out rows for the evaluation and
    frequencies). n_features: feature cards. device: where the SAE and model run (auto, cpu,
    cuda, cuda:N). out: the report's path (default: run_dir/report.html).

    A missing or malformed run folder raises CheckpointError (ConfigError for a bad option or
    argument, SourceError for a text or model that cannot be read), naming what is wrong.
    """
    check_int(tokens, "tokens", error=ConfigError)
    check_int(n_features, "n_features", minimum=0, error=ConfigError)
    dev = resolve_device(check_device(device))
    run = read_run(run_dir)
    sae = load_run_sae(run, dev)
    summary = run_summary(run, sae)
    if run.final:
        notes = [f"SAE: the run's final SAE ({run.folder / SAE_DIR}), step {run.step}."]
    else:
        notes = [
            f"SAE: the newest checkpoint, {run.sae_path} (step {run.step} of "
            f"{run.train.steps}); the run has no final SAE yet."
        ]
    cards: list[FeatureCard] = []
    freq = None
    corpus = "training-text tokens" if text is None else "report-text tokens"
    spec = _model_spec(run)
    kind = run.source.get("kind")
    if spec is not None:
        report_text = text if text is not None else spec.text
        if report_text is None:
            notes.append("The run records no text: pass one to see feature contexts.")
        else:
            model, tokenizer = _load_model(spec, run, dev)
            cards, freq, seen = feature_cards(
                sae,
                model,
                tokenizer,
                spec.hook,
                str(report_text),
                context_size=spec.context_size,
                tokens=tokens,
                n_features=n_features,
                batch_size=run.train.model_batch_size,
            )
            summary |= {"report_text": str(report_text), "report_tokens": seen}
    elif text is not None:
        raise ConfigError(
            f"text: the run in {run.folder} trained on {kind or 'unknown'} activations with no "
            "recorded model to run text through"
        )
    elif kind == "synthetic":
        held_out = build_source(run.train, dev, held_out=True)
        metrics, freq = evaluate_with_frequencies(sae, held_out, tokens)
        summary |= {f"heldout_{key}": value for key, value in metrics.items()}
        summary["feature_recovery"] = feature_recovery(held_out.true_features, sae.W_dec)
        notes.append(
            "Synthetic data has no text, so no feature contexts: feature_recovery is the mean "
            "over the true features of the best cosine similarity with a decoder row."
        )
    else:
        notes.append("The run's activations record no model, so there are no feature contexts.")
    title = f"sae_fast run {run.folder.name}: {sae.activation} SAE on {_on(run)}"
    path = Path(out) if out is not None else run.folder / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    board = run.folder / DASHBOARD_DIR
    link = None
    if (board / "index.html").is_file():  # a URL: a folder named run#1 must not cut it short
        link = quote(Path(os.path.relpath(board, path.parent)).as_posix())
    return write_html_report(
        run.folder,
        path,
        title,
        summary,
        cards,
        freq,
        run_plots=run.final,  # the run's PNGs are drawn with its final SAE
        metrics=run.metrics,
        corpus=corpus,
        notes=notes,
        dashboard=link,
    )


def _on(run: Run) -> str:
    spec = _model_spec(run)
    if spec is not None:
        return f"{spec.name} {spec.hook}"
    return f"{run.source.get('kind', 'unknown')} activations"
