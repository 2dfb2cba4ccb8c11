"""`sae-fast dashboard`: write feature dashboards: static pages a browser opens offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import integer
from ..training.config import ConfigError, check_device
from .common import (
    SubParser,
    add_model_arguments,
    add_progress_argument,
    check_counts,
    check_text,
    model_for_sae,
    pages_bar,
    token_bar,
)


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    dash = sub(
        "dashboard",
        help="write feature dashboards: static pages a browser opens offline",
        description="One streaming pass of the SAE over --text through the model (the SAE's "
        "recorded model and hook by default), memory bounded by the features shown, not the "
        "text; writes OUT/index.html (every feature, sortable, filterable by density, "
        "searchable by token) and per feature a page and a JSON record: top and "
        "quantile examples shaded by activation, the activation histogram, the nearest "
        "features by decoder cosine, the co-firing ones and the output-side effect.",
    )
    dash.add_argument("--sae", required=True, help="SAE folder (or cross-layer transcoder)")
    dash.add_argument(
        "--layer",
        type=integer,
        help="a cross-layer transcoder's source layer whose features to show, as its index "
        "0..L-1 in the CLT (the order of its hooks_in), each page with its decoder norm per "
        "target layer",
    )
    dash.add_argument("--text", required=True, help="'stdlib', a .txt or a .jsonl file")
    dash.add_argument("--out", required=True, help="dashboard folder (replaced whole)")
    add_model_arguments(dash, "the SAE's recorded one")
    dash.add_argument("--tokens", type=integer, help="tokens to read (default: the whole text)")
    dash.add_argument(
        "--features",
        default="all",
        help="'all', a count N (drawn at random, seeded) or ids like 3,17,100-120",
    )
    dash.add_argument("--batch-size", type=integer, default=32, help="text windows per forward")
    dash.add_argument(
        "--neuronpedia",
        metavar="SET",
        help="also write Neuronpedia's batch files (SAEDashboard's and the upload API's) in "
        "OUT/neuronpedia/, for the source LAYER-SET (e.g. res-sf: 3-res-sf)",
    )
    dash.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    add_progress_argument(dash)
    dash.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    import time

    from ..analysis.dashboard import build_dashboard, pick_latents
    from ..analysis.dashboard_html import FILES
    from ..analysis.neuronpedia import check_set_name
    from ..files import check_replaceable
    from ..training.config import resolve_device

    check_counts(args, "batch_size", "tokens")
    check_text(args.text, "--text")
    check_replaceable(args.out, FILES)  # before the pass, not after it
    if args.neuronpedia is not None:
        try:
            check_set_name(args.neuronpedia)
        except ValueError as e:
            raise ConfigError(f"--neuronpedia: {e}") from None
    device = resolve_device(check_device(args.device, "--device"))
    sae, extra = _features_of(args, device)
    try:
        features = pick_latents(args.features, sae.n_latents)
    except ValueError as e:
        raise ConfigError(f"--features: {e}") from None
    cfg, model, tokenizer, context_size = model_for_sae(args, sae)
    about = {"sae": str(args.sae), "model": cfg.model, "hook": cfg.hook, "text": args.text}
    started = time.perf_counter()
    with token_bar(args) as bar, pages_bar(args, features.numel()) as pages:
        meta, _ = build_dashboard(sae, model, tokenizer, args.out, about, features,
                               context_size=context_size, max_tokens=args.tokens,
                               batch_size=args.batch_size, progress=bar,
                               neuronpedia=args.neuronpedia, pages=pages,
                               extra=extra)  # fmt: skip
    print(
        f"wrote {Path(args.out) / 'index.html'}: {meta['shown']} features over "
        f"{meta['tokens_seen']} tokens in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _features_of(args: argparse.Namespace, device) -> tuple:
    """(the SAE whose features the dashboard shows, extra fields of their records or None):
    --sae itself, or a cross-layer transcoder's --layer as a transcoder of that layer."""
    from .. import formats
    from ..analysis.dashboard import clt_decoder_norms
    from ..clt import CrossLayerTranscoder
    from ..sae import SparseAutoencoder

    if formats.kind_of(args.sae) != "clt":
        if args.layer is not None:
            raise ConfigError(f"--layer: {args.sae} is an SAE, not a cross-layer transcoder")
        sae = SparseAutoencoder.load(args.sae, device=device)
        if "crosscoder" in sae.provenance:
            raise ConfigError(
                f"--sae: {args.sae} is a crosscoder, which reads several sources side by side; "
                "dashboards read one hook point (compare its sources with `sae-fast diff`)"
            )
        return sae, None
    clt = CrossLayerTranscoder.load(args.sae, device=device)
    if args.layer is None or not 0 <= args.layer < clt.n_layers:
        raise ConfigError(
            f"--layer: a cross-layer transcoder's dashboard shows one source layer's features; "
            f"give --layer 0..{clt.n_layers - 1}"
        )
    return clt.layer_transcoder(args.layer), clt_decoder_norms(clt, args.layer)
