"""`sae-fast compare`: match the features of two SAEs by decoder direction."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options import integer, is_natural
from ..training.config import ConfigError, check_device
from .common import (
    SubParser,
    add_model_arguments,
    add_progress_argument,
    check_counts,
    check_text,
    model_for_sae,
    recorded_data_options,
    token_bar,
)


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    cmp = sub(
        "compare",
        help="match the features of two SAEs by decoder direction",
        description="Each latent's best match in the other SAE by decoder cosine (both ways) "
        "and a one-to-one assignment, computed in blocks (no m x m matrix); the fractions "
        "shared above cosine thresholds, the best and worst matches, a histogram. With "
        "--text, also each latent's best match by activation correlation over the text "
        "through the model, and with --out dashboards of chosen pairs side by side.",
    )
    cmp.add_argument("a", help="SAE folder A (any format sae_fast reads)")
    cmp.add_argument("b", help="SAE folder B, of the same d_in")
    cmp.add_argument("--top", type=integer, default=10, help="best and worst matches to list")
    cmp.add_argument("--text", help="also match by activation correlation on this text")
    add_model_arguments(cmp, "A's recorded one; with --text")
    cmp.add_argument("--tokens", type=integer, help="with --text: tokens to read (default: all)")
    cmp.add_argument(
        "--pairs",
        help="with --text and --out: the pairs A:B to show side by side, like "
        "3:17,5:9 (default: the best and worst decoder matches)",
    )
    cmp.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    add_progress_argument(cmp)
    cmp.add_argument(
        "--out",
        help="folder for compare.json and cosines.png; with --text also dashboards of "
        "the chosen pairs' latents (a/, b/) and pairs.html, the pairs side by side",
    )
    cmp.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.compare import match_decoders, plot_cosines, shared_initialisation
    from ..analysis.dashboard_html import FILES as DASHBOARD_FILES
    from ..files import atomic_path, check_replaceable
    from ..sae import SparseAutoencoder
    from ..training.config import resolve_device

    check_counts(args, "top", "tokens")
    needs_text = [f"--{k}" for k in ("model", "hook", "tokens", "pairs") if getattr(args, k)]
    if needs_text and not args.text:
        raise ConfigError(f"{', '.join(needs_text)}: only used with --text")
    if args.pairs and not args.out:
        raise ConfigError("--pairs: the pairs' dashboards need --out")
    if args.text:
        check_text(args.text, "--text")
        if args.out:  # before the passes, not after them
            for side in ("a", "b"):
                check_replaceable(Path(args.out) / side, DASHBOARD_FILES)
    device = resolve_device(check_device(args.device, "--device"))
    a, b = (SparseAutoencoder.load(path, device=device) for path in (args.a, args.b))
    if (a.d_in, a.d_out) != (b.d_in, b.d_out):
        raise ConfigError(
            f"the SAEs read d_in={a.d_in} and {b.d_in} and write d_out={a.d_out} and "
            f"{b.d_out}: nothing to compare"
        )
    chosen = _parse_pairs(args.pairs, a.n_latents, b.n_latents) if args.pairs else None
    matches = match_decoders(a.W_dec, b.W_dec)
    report = {"a": str(args.a), "b": str(args.b), **matches.summary(args.top)}
    shapes = ((a.d_in, a.n_latents), (b.d_in, b.n_latents))
    alike = shared_initialisation(a.provenance, b.provenance, shapes)
    if alike:
        report["shared_initialisation"] = alike
        print(
            f"sae-fast: warning: the two SAEs started from the same weights ({alike}): rows "
            "training left near their start match without being shared features; check "
            "matches against their activation correlation (--text), or train with another "
            "--seed",
            file=sys.stderr,
        )
    shared = report["shared"]
    print(f"{args.a}: {a.n_latents} latents; {args.b}: {b.n_latents} latents")
    print("decoder cosine > t:   " + "   ".join(f"t={t}" for t in shared))
    for way in ("a_to_b", "b_to_a", "one_to_one"):
        print(f"  {way:<18} " + "  ".join(f"{shared[t][way]:>6.1%}" for t in shared))
    for name in ("best", "worst"):
        pairs = ", ".join(f"{r['a']}-{r['b']} ({r['cosine']:.3f})" for r in report[name])
        print(f"{name} matches: {pairs}")
    if args.text:
        _compare_on_text(args, a, b, matches, report, chosen)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "compare.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        plot_cosines(matches, out / "cosines.png")
        written = ["compare.json", "cosines.png"] + (
            ["a/", "b/", "pairs.html"] if args.text else []
        )
        print(f"wrote {', '.join(written)} in {out}")
    return 0


def _parse_pairs(spec: str, m_a: int, m_b: int) -> list[tuple[int, int]]:
    """--pairs 'a:b,a:b' as latent pairs of A and B."""
    pairs = []
    for part in spec.split(","):
        a, _, b = part.strip().partition(":")
        if not (is_natural(a) and is_natural(b)) or int(a) >= m_a or int(b) >= m_b:
            raise ConfigError(
                f"--pairs: expected pairs A:B of latents 0..{m_a - 1} of A and 0..{m_b - 1} of "
                f"B, like 3:17,5:9; got {part.strip()!r}"
            )
        pairs.append((int(a), int(b)))
    return pairs


def _compare_on_text(
    args: argparse.Namespace, a, b, matches, report: dict, chosen: list[tuple[int, int]] | None
) -> None:
    """Activation correlation of every latent pair over --text, and with --out, dashboards of
    the chosen pairs' latents (default: the best and worst decoder matches; OUT/a, OUT/b) and
    pairs.html side by side."""
    import math

    import torch

    from ..analysis.compare import THRESHOLDS, pair_cosines
    from ..analysis.correlation import ActivationCorrelation
    from ..analysis.dashboard import write_feature_dashboard
    from ..analysis.dashboard_html import write_pairs_page
    from ..analysis.feature_stats import FeatureStats, text_batches
    from ..sae import eval_mode

    if chosen is None:
        chosen = list(dict.fromkeys((r["a"], r["b"]) for r in report["best"] + report["worst"]))
    cfg, model, tokenizer, context_size = model_for_sae(args, a)
    recorded_data_options(b.provenance, {"model": cfg.model, "hook": cfg.hook})  # warns
    stats = [
        FeatureStats.of(sae, torch.tensor(sorted({p[side] for p in chosen})))
        for side, sae in enumerate((a, b))
    ]
    corr = ActivationCorrelation(a.n_latents, b.n_latents, a.W_dec.device)
    batches = text_batches(model, tokenizer, cfg.hook, args.text, context_size,
                           max_tokens=args.tokens)  # fmt: skip
    with (
        torch.no_grad(),
        eval_mode(a),
        eval_mode(b),
        token_bar(args) as bar,
    ):
        for ids, acts, start in batches:
            codes = [sae.encode(acts.to(sae.W_dec.device, sae.W_dec.dtype)) for sae in (a, b)]
            for stat, code in zip(stats, codes, strict=True):
                stat.add(ids, start, code)
            corr.add(*codes)
            bar.update(ids.numel())
    if stats[0].n_tokens == 0:
        raise ConfigError(f"--text: {args.text} holds no tokens")
    found = corr.result()
    report["correlation"] = {
        "text": args.text,
        "tokens": stats[0].n_tokens,
        **found.summary(matches.best_ab, THRESHOLDS),
    }
    ia, ib = (torch.tensor(side) for side in zip(*chosen, strict=True))
    r, cos = corr.pair_r(ia, ib), pair_cosines(a.W_dec, b.W_dec, ia, ib)
    report["pairs"] = [  # a latent that never fired has no correlation: null
        {"a": p[0], "b": p[1], "cosine": c, "correlation": v if math.isfinite(v) else None}
        for p, c, v in zip(chosen, cos.tolist(), r.tolist(), strict=True)
    ]
    shared = report["correlation"]["shared"]
    print(f"activation correlation over {stats[0].n_tokens} tokens of {args.text} > t:   "
          + "   ".join(f"t={t}" for t in shared))  # fmt: skip
    for way in ("a_to_b", "b_to_a"):
        print(f"  {way:<18} " + "  ".join(f"{shared[t][way]:>6.1%}" for t in shared))
    summary = report["correlation"]
    print(f"{summary['matched_a']} of A's latents have a positively correlated partner in B",
          end="")  # fmt: skip
    if summary["matched_a"]:
        print(f"; for {summary['same_as_decoder_match']:.1%} of them it is the best decoder match")
    else:
        print()
    if not args.out:
        return
    out = Path(args.out)
    records = []
    for name, sae, stat in (("a", a, stats[0]), ("b", b, stats[1])):
        about = {"sae": str(getattr(args, name)), "model": cfg.model, "hook": cfg.hook,
                 "text": args.text}  # fmt: skip
        _, recs = write_feature_dashboard(stat, sae, model, tokenizer, out / name, about,
                                          context_size)  # fmt: skip
        records.append({rec["index"]: rec for rec in recs})
    rows = [
        {"a": p["a"], "b": p["b"],
         "about": f"decoder cosine {p['cosine']:.3f}, activation correlation "
                  + (f"{p['correlation']:.3f}" if p["correlation"] is not None
                     else "none (one of them never fired)")}
        for p in report["pairs"]
    ]  # fmt: skip
    write_pairs_page(out / "pairs.html", f"{args.a} vs {args.b}", rows,
                     (("A", "a", records[0]), ("B", "b", records[1])))  # fmt: skip
