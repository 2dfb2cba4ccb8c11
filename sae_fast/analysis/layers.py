"""The layer sweep report: the SAEs of a multi-hook run side by side, hook point by hook point
(or a cross-layer transcoder's run, target layer by target layer).

Per hook point: FVU, 1 - FVU (the centred explained variance), L0, the dead and dense latent
fractions and, where the model is a causal LM, the CE loss score (CE loss recovered with the
SAE spliced in). The numbers come either from training (each run's last logged step: that
step's batch, dead and dense over the run's dead_tokens window) or from held-out text
(analysis.evaluate over the same tokens for every SAE, from one model pass; dead = never
fired on those tokens).
A cross-layer transcoder's run (train --clt) gives a row per layer: its output's FVU (all
source layers' writes to it) and its own features' L0, from training (the last logged step's
fvu/T and l0/T) or from held-out text (analysis.clt_eval.clt_metrics; dead: layer T's
features that never fired on those tokens).
Written as layers.json, layers.png and layers.html in the run folder.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..files import atomic_path, read_json
from ..sae import SparseAutoencoder
from ..sources.hooks import is_causal_lm
from ..sources.model import ModelSource
from ..sources.streams import hook_streams
from ..training.checkpoints import METRICS_FILE, RUN_CONFIG_FILE, SAE_DIR
from ..training.config import ConfigError
from ..training.metrics import read_jsonl
from ..training.multi import hook_runs
from ..training.plots import pyplot, save_figure
from .evaluate import ce_loss_recovered, evaluate

REPORT, PLOT, TABLE = "layers.html", "layers.png", "layers.json"
TRAINING_NOTE = (
    "From training: each SAE's last logged step (that step's batch; dead and dense over the "
    "dead_tokens window)."
)
CLT_TRAINING_NOTE = "From training: the run's last logged step (that step's batch)."
# (key, label, which way is better: -1 lower, 1 higher, 0 neither)
METRICS = (
    ("fvu", "FVU", -1),
    ("one_minus_fvu", "1 - FVU", 1),
    ("l0", "L0", 0),
    ("dead_fraction", "dead fraction", -1),
    ("dense_fraction", "dense fraction", -1),
    ("ce_loss_score", "CE loss score", 1),
)


def clt_layers(run_dir: str | Path) -> list[int] | None:
    """The layers of the cross-layer transcoder run in run_dir (train --clt), or None for
    another run."""
    try:
        body = read_json(Path(run_dir) / RUN_CONFIG_FILE, ConfigError)
    except ConfigError:
        return None
    layers = body.get("layers") if isinstance(body, dict) else None
    clt = isinstance(body, dict) and (body.get("train") or {}).get("clt")
    return layers if clt and isinstance(layers, list) else None


def clt_training_rows(run_dir: str | Path, layers: list[int]) -> list[dict]:
    """Per layer of a CLT run, its last logged step's FVU (of the layer's output) and L0 (of
    the layer's features)."""
    path = Path(run_dir) / METRICS_FILE
    logged = read_jsonl(path) if path.exists() else []
    if not logged:
        raise ConfigError(f"{run_dir} has logged no step yet")
    last = logged[-1]
    return [
        {"hook": f"layer {t}", "step": last["step"], "tokens": last["tokens"],
         "fvu": last[f"fvu/{t}"], "one_minus_fvu": 1 - last[f"fvu/{t}"], "l0": last[f"l0/{t}"]}
        for t in layers
    ]  # fmt: skip


def clt_evaluated_rows(metrics: dict, layers: list[int]) -> list[dict]:
    """Per layer, a CLT's held-out clt_metrics (fvu, l0, dead_fraction lists)."""
    return [
        {"hook": f"layer {t}", "tokens": metrics["tokens"], "fvu": metrics["fvu"][i],
         "one_minus_fvu": 1 - metrics["fvu"][i], "l0": metrics["l0"][i],
         "dead_fraction": metrics["dead_fraction"][i]}
        for i, t in enumerate(layers)
    ]  # fmt: skip


def sweep_runs(run_dir: str | Path) -> dict[str, Path]:
    """hook point -> its run folder, for the multi-hook run in run_dir (ConfigError if
    run_dir holds none)."""
    found = hook_runs(run_dir)
    if found is None:
        raise ConfigError(
            f"{run_dir} is not a multi-hook run (its {RUN_CONFIG_FILE} names no hooks): "
            "train one with --hooks"
        )
    return found


def load_saes(run_dir: str | Path, device: str = "cpu") -> dict[str, SparseAutoencoder]:
    """Each hook point's trained SAE (its run's sae/ folder)."""
    saes = {}
    for hook, folder in sweep_runs(run_dir).items():
        if not (folder / SAE_DIR).is_dir():
            raise ConfigError(f"{folder} has no trained SAE yet ({SAE_DIR}/): finish the run")
        saes[hook] = SparseAutoencoder.load(folder / SAE_DIR, device=device)
    return saes


def training_rows(run_dir: str | Path) -> list[dict]:
    """Per hook point, the metrics of its run's last logged step."""
    rows = []
    for hook, folder in sweep_runs(run_dir).items():
        logged = read_jsonl(folder / METRICS_FILE) if (folder / METRICS_FILE).exists() else []
        if not logged:
            raise ConfigError(f"{folder} has logged no step yet")
        last = logged[-1]
        rows.append(
            {
                "hook": hook,
                "step": last["step"],
                "tokens": last["tokens"],
                "fvu": last["fvu"],
                "one_minus_fvu": 1 - last["fvu"],
                "l0": last["l0"],
                "dead_fraction": last["dead_fraction"],
                "dense_fraction": last["dense_fraction"],
            }
        )
    return rows


def evaluated_rows(
    saes: dict[str, SparseAutoencoder],
    source: ModelSource,
    tokens: int,
    batch_size: int = 4096,
    ce_windows: int = 64,
    dense_threshold: float = 0.1,
) -> list[dict]:
    """Per hook point of source (which reads all of saes' hook points), its SAE evaluated on
    the same `tokens` rows (analysis.evaluate), from one model pass; for a causal LM also
    the CE loss score over ce_windows windows of source's text (one spliced pass per hook)."""
    if set(saes) != set(source.hooks):
        raise ConfigError(f"SAEs for {sorted(saes)} but the source reads {list(source.hooks)}")
    causal = is_causal_lm(source.model.config, [type(source.model).__name__])
    rows = []
    for stream in hook_streams(source):
        sae = saes[stream.hook]
        found = evaluate(sae, stream, tokens, batch_size, dense_threshold)
        found["one_minus_fvu"] = 1 - found["fvu"]
        row = {"hook": stream.hook, **{k: found[k] for k in ("tokens", *_keys(found))}}
        if causal:
            ce = ce_loss_recovered(
                source.model,
                source.tokenizer,
                stream.hook,
                sae,
                str(source.documents_spec),
                source.context_size,
                source.batch_size,
                ce_windows,
            )
            row |= {k: ce[k] for k in ("ce_loss_score", "kl_div_score", "ce_tokens")}
        rows.append(row)
    return rows


def _shown(value: object) -> bool:
    """Whether a row's value goes into the JSON and the table (a NaN, say of an FVU over
    constant activations, does not)."""
    return not isinstance(value, float) or math.isfinite(value)


def _keys(found: dict) -> list[str]:
    return [key for key, _, _ in METRICS if key in found]


def _best(rows: list[dict], key: str, sign: int) -> float | None:
    values = [row[key] for row in rows if key in row and _shown(row[key])]
    if not sign or not values:
        return None
    return max(values) if sign > 0 else min(values)


def plot_layers(rows: list[dict], path: str | Path, title: str) -> Path:
    """One panel per metric (METRICS) against the hook points, in their order."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    hooks = [row["hook"] for row in rows]
    for ax, (key, label, _) in zip(axes.flat, METRICS, strict=True):
        points = [(i, row[key]) for i, row in enumerate(rows) if key in row and _shown(row[key])]
        ax.set_title(label)
        ax.set_xticks(range(len(hooks)), hooks, rotation=30, ha="right", fontsize=8)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        else:
            ax.text(0.5, 0.5, "causal LMs only", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell(row: dict, key: str, best: float | None) -> str:
    if key not in row or not _shown(row[key]):
        return "<td>-</td>"
    value = row[key]
    mark = " class='best'" if best is not None and value == best else ""
    return f"<td{mark}>{value:.4g}</td>"


def _curves_link(run_dir: Path, hook: str) -> str:
    """The row's label, linked to its run's training curves where it has a run of its own."""
    label = html.escape(hook)
    if not (run_dir / hook / "training_curves.png").is_file():
        return label
    return f"<a href='{html.escape(hook, quote=True)}/training_curves.png'>{label}</a>"


def write_layer_report(run_dir: str | Path, rows: list[dict], about: str) -> list[Path]:
    """layers.json, layers.png and layers.html in run_dir for rows (training_rows,
    evaluated_rows, or a CLT's); about says where the numbers come from."""
    run_dir = Path(run_dir)
    model = read_json(run_dir / RUN_CONFIG_FILE, ConfigError)["train"].get("model")
    title = (
        f"Cross-layer transcoder: {model}, {len(rows)} layers"
        if clt_layers(run_dir)
        else f"Layer sweep: {model}, {len(rows)} hook points"
    )
    with atomic_path(run_dir / TABLE) as tmp:
        finite = [{k: v for k, v in row.items() if _shown(v)} for row in rows]
        body = {"title": title, "about": about, "rows": finite}
        tmp.write_text(json.dumps(body, indent=2, allow_nan=False) + "\n")
    plot = plot_layers(rows, run_dir / PLOT, title)
    shown = [(key, label, sign) for key, label, sign in METRICS if any(key in r for r in rows)]
    best = {key: _best(rows, key, sign) for key, _, sign in shown}
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in shown)
    lines = "".join(
        f"<tr><th>{_curves_link(run_dir, row['hook'])}</th>"
        + "".join(_cell(row, key, best[key]) for key, _, _ in shown)
        + "</tr>"
        for row in rows
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th:first-child{text-align:left}"
        ".best{background:#d9ead3;font-weight:bold}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(about)}</p>"
        "<p>The best value of each column is shaded; each hook point with a run of its own "
        f"links to its training curves.</p><table id='layers'><tr><th>hook point</th>{head}"
        f"</tr>{lines}</table>"
        f"<img src='{PLOT}' alt='the metrics against the hook points'></body></html>"
    )
    with atomic_path(run_dir / REPORT) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return [run_dir / TABLE, plot, run_dir / REPORT]
