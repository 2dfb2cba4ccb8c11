"""A dashboard folder as static files a browser opens offline (no server, no CDN):

    index.html, data.js          every shown feature, sortable, filterable, searchable
    dashboard.css, dashboard.js  the index's style and script (package files)
    dashboard.json               the run: SAE, model, hook, text, tokens, density histogram
    features/<i>.html, <i>.json  one page and one schema record per feature

data.js sets window.SAE_DASHBOARD, since a page opened from a file cannot fetch JSON: its
rows are [index, density, max, mean, summary, top tokens].
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import atomic_folder, atomic_path

FEATURES_DIR = "features"  # a dashboard's feature pages: FEATURES_DIR/INDEX.html

# A dashboard's top-level files; its features/ folder is replaceable through the manifest.
FILES = ("index.html", "data.js", "dashboard.css", "dashboard.js", "dashboard.json")
_ASSETS = Path(__file__).parent
NONE = "<p class='muted'>none</p>"
DENSITY_DECADES = 7  # the index's density histogram spans 1e-7 to 1 (log10 bins)
_BINS_PER_DECADE = 4


def _head(title: str, css: str | None) -> str:
    link = f"<link rel='stylesheet' href='{css}'>" if css else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"{link}</head><body>"
    )


def bars_svg(
    heights: list[float], left: str, right: str, caption: str, width: int = 520, height: int = 140
) -> str:
    """An inline SVG bar chart: equal-width bars, labels under both ends, a title."""
    top = max(heights, default=0) or 1
    n = max(len(heights), 1)
    w = width / n
    rects = "".join(
        f"<rect x='{i * w:.2f}' y='{height - h / top * height:.2f}' width='{max(w - 1, 1):.2f}' "
        f"height='{h / top * height:.2f}'><title>{h:g}</title></rect>"
        for i, h in enumerate(heights)
        if h > 0
    )
    return (
        f"<svg class='bars' role='img' aria-label='{html.escape(caption, quote=True)}' "
        f"width='{width}' height='{height + 34}' viewBox='0 0 {width} {height + 34}'>"
        f"<title>{html.escape(caption)}</title>{rects}"
        f"<line x1='0' y1='{height}' x2='{width}' y2='{height}' stroke='#888'/>"
        f"<text x='0' y='{height + 14}'>{html.escape(left)}</text>"
        f"<text x='{width}' y='{height + 14}' text-anchor='end'>{html.escape(right)}</text>"
        f"<text x='{width / 2}' y='{height + 30}' text-anchor='middle'>{html.escape(caption)}"
        "</text></svg>"
    )


def density_histogram(firings: Tensor, n_tokens: int) -> dict:
    """Counts of latents by log10 firing density: edges (log10), counts, and the dead ones."""
    density = firings.double().cpu() / max(n_tokens, 1)
    alive = density[density > 0]
    bins = DENSITY_DECADES * _BINS_PER_DECADE
    where = ((alive.log10() + DENSITY_DECADES) * _BINS_PER_DECADE).floor().long()
    counts = torch.bincount(where.clamp(0, bins - 1), minlength=bins)
    edges = [-DENSITY_DECADES + i / _BINS_PER_DECADE for i in range(bins + 1)]
    return {"log10_edges": edges, "counts": counts.tolist(), "dead": int((density == 0).sum())}


def context_html(example: dict, scale: float) -> str:
    """One example's tokens, each shaded by its activation over scale; hover for the value."""
    spans = []
    for i, (token, value) in enumerate(zip(example["tokens"], example["values"], strict=True)):
        text = html.escape(token)
        if value <= 0 and i != example["token_index"]:
            spans.append(text)  # most tokens: plain text keeps the pages small
            continue
        alpha = min(value / scale, 1.0) if scale > 0 else 0.0
        mark = " class='at'" if i == example["token_index"] else ""
        spans.append(
            f"<span{mark} title='{value:.3f}' style='background:rgba(230,126,34,{alpha:.2f})'>"
            f"{text}</span>"
        )
    return (
        f"<div class='ctx'><span class='value'>{example['value']:.3f}</span>{''.join(spans)}</div>"
    )


def _link(index: int, shown: set[int]) -> str:
    return f"<a href='{index}.html'>{index}</a>" if index in shown else str(index)


def _rows(header: tuple[str, ...], rows: list[tuple]) -> str:
    if not rows:
        return NONE
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def feature_page(record: dict, shown: set[int], neighbours: tuple[int | None, int | None]) -> str:
    """A feature's page: statistics, histogram, top and quantile examples, nearest decoder
    features, co-firing features, output-side effect."""
    i, scale = record["index"], record["max_activation"]
    hist = record["histogram"]
    prev, nxt = neighbours
    nav = (
        "<nav><a href='../index.html'>all features</a>"
        + "".join(
            f"<a href='{j}.html'>{label}</a>"
            for j, label in ((prev, "previous"), (nxt, "next"))
            if j is not None
        )
        + "</nav>"
    )
    stats = _rows(
        ("density", "firings", "tokens read", "max activation", "mean activation"),
        [
            (
                f"{100 * record['density']:.4g}%",
                record["firings"],
                record["tokens_seen"],
                f"{record['max_activation']:.4g}",
                f"{record['mean_activation']:.4g}",
            )
        ],
    )
    chart = (
        bars_svg(
            hist["counts"],
            "0",
            f"{hist['bin_width'] * len(hist['counts']):.3g}",
            "activation histogram (firings)",
        )
        if hist["counts"]
        else "<p class='muted'>never fired on this text</p>"
    )
    top = "".join(context_html(e, scale) for e in record["top_examples"])
    quantiles = "".join(
        f"<h3>activation quantile {100 * g['quantile'][0]:.0f}-{100 * g['quantile'][1]:.0f}% "
        f"<span class='muted'>(values {g['value_range'][0]:.3f}-{g['value_range'][1]:.3f}, "
        f"{g['sampled']} sampled)</span></h3>"
        + "".join(context_html(e, scale) for e in g["examples"])
        for g in record["quantile_examples"]
    )
    near = _rows(
        ("feature", "cosine"),
        [(_link(n["index"], shown), f"{n['cosine']:.3f}") for n in record["nearest_decoder"]],
    )
    fires = _rows(
        ("feature", "Jaccard", "P(fires | this fires)"),
        [
            (_link(c["index"], shown), f"{c['jaccard']:.3f}", f"{c['given']:.2f}")
            for c in record["cofiring"]
        ],
    )
    writes = record.get("decoder_norms")  # a CLT feature's, to its layer and every later one
    targets = (
        "<h2>Decoder norm per target layer</h2>"
        + bars_svg(
            [w["norm"] for w in writes],
            str(writes[0]["target"]),
            str(writes[-1]["target"]),
            "decoder norm by target layer",
        )
        + _rows(
            ("target layer", "writes to", "decoder norm"),
            [(w["target"], html.escape(w["hook"] or "-"), f"{w['norm']:.4g}") for w in writes],
        )
        if writes
        else ""
    )
    effect = record["output_effect"]
    first = "promoted" if effect["kind"] == "unembedding_logits" else "nearest"
    sides = "".join(
        f"<div><h3>{name}</h3>"
        + _rows(
            ("token", "value"),
            [(html.escape(repr(t["token"])), f"{t['value']:.3f}") for t in effect[side]],
        )
        + "</div>"
        for side, name in (("positive", first), ("negative", "suppressed"))
        if effect[side]
    )
    return (
        _head(f"feature {i}", "../dashboard.css")
        + f"{nav}<h1>Feature {i}</h1><p>{html.escape(record['summary'] or '(no firings)')}</p>"
        + stats
        + chart
        + "<h2>Top activations</h2>"
        + (top or NONE)
        + "<h2>Examples by activation quantile</h2>"
        + "<p class='muted'>from a uniform sample of its firings, cut into equal-count groups</p>"
        + (quantiles or NONE)
        + targets
        + f"<div class='cols'><div><h2>Nearest by decoder cosine</h2>{near}</div>"
        + f"<div><h2>Co-firing</h2>{fires}</div></div>"
        + f"<h2>Output side</h2><p>{html.escape(effect['label'])}</p>"
        + f"<div class='cols'>{sides}</div></body></html>\n"
    )


def index_page(meta: dict) -> str:
    """The index: the run, the density histogram of every latent, the features table."""
    hist = meta["density_histogram"]
    chart = bars_svg(
        hist["counts"],
        f"1e-{DENSITY_DECADES}",
        "1",
        f"latents by log10 firing density ({hist['dead']} never fired)",
    )
    facts = _rows(
        ("SAE", "model", "hook", "text", "tokens read", "latents", "shown"),
        [
            tuple(
                html.escape(str(meta[k]))
                for k in ("sae", "model", "hook", "text", "tokens_seen", "n_latents", "shown")
            )
        ],
    )
    return (
        _head(f"dashboard: {meta['sae']}", "dashboard.css")
        + f"<h1>Feature dashboard</h1>{facts}{chart}"
        + "<div class='controls'><label>search tokens <input id='search' type='search'></label>"
        + "<label>density from <input id='dmin' type='number' step='any' min='0'>%</label>"
        + "<label>to <input id='dmax' type='number' step='any' min='0'>%</label>"
        + "<span id='count'></span></div>"
        + "<table id='features'><thead><tr><th>feature</th><th>density</th><th>max</th>"
        + "<th>mean</th><th>top tokens</th></tr></thead><tbody></tbody></table>"
        + "<button id='more' hidden>more</button>"
        + "<script src='data.js'></script><script src='dashboard.js'></script></body></html>\n"
    )


PAIR_EXAMPLES = 5  # top contexts per side on a page of pairs


def feature_href(folder: str, latent: int) -> str:
    """The address of latent's page in the dashboard at folder (relative or not), escaped
    for an HTML attribute."""
    return html.escape(f"{folder}/{FEATURES_DIR}/{latent}.html", quote=True)


def _side(label: str, folder: str, record: dict) -> str:
    i = record["index"]
    href = feature_href(folder, i)
    top = "".join(
        context_html(e, record["max_activation"]) for e in record["top_examples"][:PAIR_EXAMPLES]
    )
    return (
        f"<div class='side'><h3>{html.escape(label)} <a href='{href}'>{i}</a></h3>"
        f"<p>{html.escape(record['summary'] or '(no firings)')}</p><p class='muted'>density "
        f"{100 * record['density']:.4g}%, max {record['max_activation']:.3g}</p>"
        f"{top or '<p class=muted>never fired on this text</p>'}</div>"
    )


def write_pairs_page(
    path: str | Path,
    title: str,
    pairs: list[dict],
    sides: tuple[tuple[str, str, dict], tuple[str, str, dict]],
) -> Path:
    """Write a page of feature pairs side by side at path (atomically); returns path.
    pairs: {"a", "b", "about"} each (latent ids and a line on how they match); sides: per side
    (label, dashboard folder relative to the page, {latent: record})."""
    (label_a, folder_a, rec_a), (label_b, folder_b, rec_b) = sides
    body = (
        "".join(
            f"<h2>{html.escape(label_a)} {p['a']} / {html.escape(label_b)} {p['b']}: "
            f"<span class='muted'>{html.escape(p['about'])}</span></h2><div class='pair'>"
            f"{_side(label_a, folder_a, rec_a[p['a']])}"
            f"{_side(label_b, folder_b, rec_b[p['b']])}</div>"
            for p in pairs
        )
        or "<p class='muted'>no pairs to show</p>"
    )
    page = (
        _head(title, f"{folder_a}/dashboard.css" if pairs else None)  # no pairs: no dashboards
        + f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def top_tokens(record: dict) -> str:
    """The distinct tokens of a record's top examples (where it fires most), for the index's
    search: 'class def return'."""
    found = {e["tokens"][e["token_index"]].strip() for e in record["top_examples"]}
    return " ".join(sorted(found - {""}))


def _json(value: object, **kw) -> str:
    return json.dumps(value, allow_nan=False, **kw)  # strict JSON: other tools read it


def write_dashboard(
    out: str | Path,
    records: list[dict],
    meta: dict,
    extra: dict[str, str] | None = None,
    progress: Any = None,
) -> Path:
    """Write the folder (the module docstring) at out, whole or not at all; returns out.

    meta: sae, model, hook, text, tokens_seen, n_latents, shown, density_histogram, effect.
    extra: more files of the folder, {relative path: text} (neuronpedia.py's). progress: a
    tqdm-like bar updated once per feature's pages, or None.
    """
    out = Path(out)
    shown = {r["index"] for r in records}
    order = [r["index"] for r in records]
    rows = [
        [r["index"], r["density"], r["max_activation"], r["mean_activation"], r["summary"],
         top_tokens(r)]
        for r in records
    ]  # fmt: skip
    with atomic_folder(out, replaceable=FILES) as tmp:
        (tmp / FEATURES_DIR).mkdir()
        for pos, record in enumerate(records):
            prev = order[pos - 1] if pos > 0 else None
            nxt = order[pos + 1] if pos + 1 < len(order) else None
            name = tmp / FEATURES_DIR / str(record["index"])
            name.with_suffix(".json").write_text(
                _json(record, separators=(",", ":")) + "\n", encoding="utf-8"
            )
            name.with_suffix(".html").write_text(
                feature_page(record, shown, (prev, nxt)), encoding="utf-8"
            )
            if progress is not None:
                progress.update(1)
        (tmp / "dashboard.json").write_text(_json(meta, indent=2) + "\n", encoding="utf-8")
        data = _json({"meta": meta, "features": rows})
        (tmp / "data.js").write_text(f"window.SAE_DASHBOARD = {data};\n", encoding="utf-8")
        (tmp / "index.html").write_text(index_page(meta), encoding="utf-8")
        for asset in ("dashboard.css", "dashboard.js"):
            shutil.copyfile(_ASSETS / asset, tmp / asset)
        for name, text in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text + "\n", encoding="utf-8")
    return out
