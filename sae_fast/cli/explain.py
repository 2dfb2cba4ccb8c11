"""`sae-fast explain`: the latents that fire on each token of a text."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..options import integer
from ..training.config import ConfigError, check_device
from .common import SubParser, add_model_arguments, check_counts, model_for_sae


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    ex = sub(
        "explain",
        help="the latents that fire on each token of a text",
        description="Run the model on TEXT to the hook point (the SAE's recorded model and "
        "hook by default) and list each token's top latents with their values; with "
        "--contexts, what each of those latents fires on most in a reference text; with "
        "--html, a page of the text shaded by activation.",
    )
    ex.add_argument("text", help="the text to explain")
    ex.add_argument("--sae", required=True, help="SAE folder")
    add_model_arguments(ex, "the SAE's recorded one")
    ex.add_argument("--top", type=integer, default=5, help="latents per token")
    ex.add_argument("--contexts", help="reference text for the latents' summaries")
    ex.add_argument("--context-tokens", type=integer, default=20000, help="tokens of --contexts")
    ex.add_argument("--html", help="also write an HTML view here")
    ex.add_argument(
        "--dashboard",
        help="this SAE's feature dashboard folder (sae-fast dashboard --out): the HTML view's "
        "latents link to their pages there",
    )
    ex.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    ex.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.explain import explain_html, explain_text, feature_text, summaries
    from ..analysis.features import collect_activations
    from ..files import atomic_path
    from ..sae import SparseAutoencoder
    from ..training.config import resolve_device

    check_counts(args, "top", "context_tokens")
    if not args.text.strip():
        raise ConfigError("text: give the text to explain")
    if args.dashboard is not None:
        if args.html is None:
            raise ConfigError("--dashboard links the pages of --html: give --html too")
        if not (Path(args.dashboard) / "index.html").is_file():
            raise ConfigError(f"--dashboard: {args.dashboard} is not a feature dashboard")
    device = resolve_device(check_device(args.device, "--device"))
    sae = SparseAutoencoder.load(args.sae, device=device)
    cfg, model, tokenizer, context_size = model_for_sae(args, sae)
    rows = explain_text(sae, model, tokenizer, cfg.hook, args.text, context_size, args.top)
    notes = {}
    if args.contexts:
        acts = collect_activations(sae, model, tokenizer, cfg.hook, args.contexts,
                                   context_size, max_windows=None,
                                   max_tokens=args.context_tokens)  # fmt: skip
        notes = summaries(acts, tokenizer, sorted({i for r in rows for i, _ in r.features}))
    pad = max((len(r.token) for r in rows), default=5)
    for r in rows:
        print(f"{r.token:<{pad}}  {feature_text(r, notes) or '-'}")
    if args.html:
        links = _dashboard_links(args.dashboard, args.html, rows) if args.dashboard else {}
        with atomic_path(args.html) as tmp:
            tmp.write_text(explain_html(rows, notes, f"{cfg.hook} of {cfg.model}", links))
        print(f"wrote {args.html}")
    return 0


def _dashboard_links(dashboard: str, page: str, rows) -> dict[int, str]:
    """latent -> the address of its page in dashboard, relative to the page written, for the
    latents of rows the dashboard has a page of (it may show some latents only)."""
    from ..analysis.dashboard_html import FEATURES_DIR, feature_href

    folder = os.path.relpath(dashboard, start=Path(page).resolve().parent)
    latents = {i for r in rows for i, _ in r.features}
    return {
        i: feature_href(Path(folder).as_posix(), i)
        for i in sorted(latents)
        if (Path(dashboard) / FEATURES_DIR / f"{i}.html").is_file()
    }
