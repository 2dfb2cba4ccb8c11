"""`sae-fast drift`: which latents fire more or less often on one text than on another."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..options import decimal, integer
from ..training.config import ConfigError, TrainConfig, check_device
from .common import (
    TRAINING_ONLY,
    SubParser,
    add_config_arguments,
    add_progress_argument,
    add_sae_pass_arguments,
    check_counts,
    check_text,
    fit_context,
    given_options,
    recorded_data_options,
    token_bar,
)
from .summary import add_json_argument, show, table


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    dr = sub(
        "drift",
        help="which latents fire more or less often on one text than on another",
        description="Each latent's firing frequency on --text (A) and on --against (B), "
        "through the model at the hook point (the SAE's recorded ones by default); the "
        "latents whose rates differ by a two-proportion z-test after a Benjamini-Hochberg "
        "correction, and the Jensen-Shannon divergence of the firing shares.",
    )
    add_sae_pass_arguments(dr, "activations per corpus")
    dr.add_argument("--against", required=True, help="corpus B (the same kinds as --text)")
    dr.add_argument("--alpha", type=decimal, default=0.01, help="false discovery rate")
    dr.add_argument("--top", type=integer, default=20, help="movers to list")
    dr.add_argument("--out", help="also write the report to this JSON file")
    dr.add_argument(
        "--dashboard",
        help="folder for the top movers' dashboards on A (a/) and B (b/) and "
        "movers.html, each mover's pages side by side",
    )
    add_progress_argument(dr)
    add_json_argument(dr)
    add_config_arguments(dr, ("data",), omit=TRAINING_ONLY)
    dr.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.drift import feature_drift
    from ..analysis.evaluate import evaluate_with_frequencies
    from ..sae import SparseAutoencoder
    from ..sources import build_source
    from ..sources.factory import model_source
    from ..training.config import resolve_device

    check_counts(args, "top")
    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {args.alpha}")
    device = resolve_device(check_device(args.device, "--device"))
    sae = SparseAutoencoder.load(args.sae, device=device)
    given = given_options(args, ("data",))
    if "text" not in given:
        raise ConfigError("--text: give the reference corpus A (--against is B)")
    cfg = TrainConfig.from_dict(recorded_data_options(sae.provenance, given), where="the data")
    if cfg.source != "model":
        raise ConfigError("drift compares two texts through a model: it needs source=model")
    for flag, text in (("--text", cfg.text), ("--against", args.against)):
        check_text(text, flag)
    if args.dashboard:  # before the passes, not after them
        from ..analysis.dashboard_html import FILES
        from ..files import check_replaceable

        for side in ("a", "b"):
            check_replaceable(Path(args.dashboard) / side, FILES)
    found, source = [], None
    for text in (cfg.text, args.against):
        # A shuffle buffer of at most --tokens rows: the text is read again only when it
        # holds fewer tokens than that.
        options = dataclasses.replace(
            cfg, text=text, shuffle_buffer=min(cfg.shuffle_buffer, args.tokens)
        )
        if source is None:
            source = build_source(options, device)
        else:  # B through the model A's source loaded
            source = model_source(options, source.model, source.tokenizer, device)
        metrics, freq = evaluate_with_frequencies(sae, source, args.tokens, args.batch_size)
        if source.epoch > 0:  # the text ran out and was read again
            print(
                f"sae-fast: warning: {text} holds fewer than --tokens={args.tokens} tokens; "
                "its repeated tokens count again in the test",
                file=sys.stderr,
            )
        found.append((freq, metrics["tokens"]))
    (freq_a, n_a), (freq_b, n_b) = found
    drift = feature_drift(freq_a, n_a, freq_b, n_b, args.alpha)
    report = {"text_a": cfg.text, "text_b": args.against, **drift.summary(args.top)}
    if args.dashboard:
        _drift_dashboards(args, sae, cfg, source, report)
    movers = table(report["top"], ("latent", "direction", "freq_a", "freq_b", "z"))
    show(
        args,
        report,
        f"{report['appeared']} latents appear and {report['vanished']} vanish from A to B "
        f"(of {sae.n_latents}, FDR {args.alpha}); Jensen-Shannon divergence "
        f"{report['js_divergence']:.4f}\n{movers}",
    )
    if args.out:
        from ..files import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _drift_dashboards(args: argparse.Namespace, sae, cfg: TrainConfig, source, report: dict):
    """Dashboards of the top movers over each corpus (DIR/a, DIR/b) and DIR/movers.html, each
    mover's two pages side by side."""
    import torch

    from ..analysis.dashboard import build_dashboard
    from ..analysis.dashboard_html import write_pairs_page

    out = Path(args.dashboard)
    out.mkdir(parents=True, exist_ok=True)
    movers = [row["latent"] for row in report["top"]]
    records = []
    context_size = fit_context(source.model, cfg.context_size)
    for name, text in (("a", cfg.text), ("b", args.against)) if movers else ():
        # A transcoder's latents read its input hook point.
        hook = cfg.hook or cfg.hook_in
        about = {"sae": str(args.sae), "model": cfg.model, "hook": hook, "text": text}
        with token_bar(args) as bar:
            _, found = build_dashboard(
                sae, source.model, source.tokenizer, out / name, about,
                torch.tensor(movers, dtype=torch.int64), context_size=context_size,
                max_tokens=args.tokens, progress=bar,
            )  # fmt: skip
        records.append({r["index"]: r for r in found})
    rows = [
        {"a": r["latent"], "b": r["latent"],
         "about": f"{r['direction']}: fires on {r['freq_a']:.3%} of A, {r['freq_b']:.3%} of B "
                  f"(z {r['z']:+.1f})"}
        for r in report["top"]
    ]  # fmt: skip
    records = records or [{}, {}]
    write_pairs_page(out / "movers.html", f"drift of {args.sae}: {cfg.text} -> {args.against}",
                     rows, (("on A", "a", records[0]), ("on B", "b", records[1])))  # fmt: skip
    report["dashboard"] = str(out / "movers.html")
    print(f"wrote {out / 'movers.html'}: the top movers' dashboards on A and on B")
