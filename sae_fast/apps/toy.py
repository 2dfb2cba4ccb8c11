"""The seed toy experiment: sparsity against reconstruction on data with a known dictionary.

Data as in the SAE primer the project grew from: d=10, 24 unit ground-truth features, 3
active per row with coefficients uniform in [0.5, 1.5], noise 0.02. ReLU + L1 with a rising
coefficient should give fewer active latents and a higher MSE; TopK with k = 1..8 draws the
reconstruction-sparsity frontier (MSE against L0).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..analysis.evaluate import evaluate
from ..sources.synthetic import HELD_OUT_STREAM, SyntheticSource, feature_recovery
from ..training.config import TrainConfig
from ..training.trainer import Trainer

TOY = {"d_in": 10, "n_features": 24, "k_active": 3, "noise": 0.02}
L1_COEFS = (0.0005, 0.01, 0.1, 0.3, 1.0, 3.0)
KS = (1, 2, 3, 4, 6, 8)
_EVAL_TOKENS = 8192


def toy_point(activation: str, steps: int, seed: int = 0, **options) -> dict:
    """Train one SAE with 24 latents on the toy data; held-out mse, l0, feature recovery."""
    train_data = SyntheticSource(**TOY, seed=seed)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(
            source="synthetic",
            activation=activation,
            n_latents=TOY["n_features"],
            steps=steps,
            batch_size=256,
            lr=1e-2,
            lr_warmup_steps=min(50, steps),
            normalize_input=False,
            dead_tokens=2048,
            checkpoint_every=0,
            keep_checkpoints=1,
            log_every=steps,
            seed=seed,
            out_dir=run_dir,
            progress=False,
            plots=False,
            **options,
        )
        sae = Trainer(cfg, train_data).train().sae
    # The seed fixes the dictionary too: held-out rows come from the training dictionary.
    held_out = SyntheticSource(**TOY, seed=seed, stream_seed=seed + HELD_OUT_STREAM)
    metrics = evaluate(sae, held_out, _EVAL_TOKENS)
    recovery = feature_recovery(train_data.true_features, sae.W_dec.detach())
    return {"mse": metrics["mse"], "l0": metrics["l0"], "feature_recovery": recovery}


def l1_sweep(coefs: tuple[float, ...] = L1_COEFS, steps: int = 1000) -> list[dict]:
    """ReLU + L1 SAEs, one per coefficient."""
    return [{"l1_coef": c, **toy_point("relu", steps, l1_coef=c)} for c in coefs]


def k_sweep(ks: tuple[int, ...] = KS, steps: int = 1000) -> list[dict]:
    """TopK SAEs, one per k."""
    return [{"k": k, **toy_point("topk", steps, k=k)} for k in ks]


def plot_frontier(l1: list[dict], topk: list[dict], path: str | Path) -> Path:
    """MSE against L0 for both sweeps, each point labelled with its k or coefficient."""
    from ..training.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rows, key, label in ((topk, "k", "TopK"), (l1, "l1_coef", "ReLU + L1")):
        ax.plot([r["l0"] for r in rows], [r["mse"] for r in rows], "o-", label=label)
        for r in rows:
            ax.annotate(f"{key}={r[key]:g}", (r["l0"], r["mse"]), fontsize=7)
    ax.axvline(TOY["k_active"], color="gray", ls=":", label="true active features")
    ax.set_xlabel("L0 (active latents per row)")
    ax.set_ylabel("MSE (held out)")
    ax.set_yscale("log")
    ax.set_title("toy data: d=10, 24 features, 3 active, noise 0.02")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def run_toy(out: str | Path = "runs/toy", steps: int = 1000) -> dict:
    """Both sweeps; writes toy.json and toy_frontier.png in out and prints a table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    l1, topk = l1_sweep(steps=steps), k_sweep(steps=steps)
    result = {"data": TOY, "steps": steps, "l1": l1, "topk": topk}
    (out / "toy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_frontier(result["l1"], result["topk"], out / "toy_frontier.png")
    print(f"{'SAE':<18}{'L0':>8}{'MSE':>12}{'recovery':>10}")
    for row in result["l1"]:
        name = f"relu l1={row['l1_coef']:g}"
        print(f"{name:<18}{row['l0']:>8.2f}{row['mse']:>12.5f}{row['feature_recovery']:>10.3f}")
    for row in result["topk"]:
        name = f"topk k={row['k']}"
        print(f"{name:<18}{row['l0']:>8.2f}{row['mse']:>12.5f}{row['feature_recovery']:>10.3f}")
    print(f"wrote {out / 'toy.json'} and {out / 'toy_frontier.png'}")
    return result
