"""`sae-fast cache`: write model activations to an on-disk cache."""

from __future__ import annotations

import argparse

from ..options import ACTIVATION_DTYPES, integer
from ..training.config import check_device
from .common import SubParser, check_counts, check_text


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    cache = sub(
        "cache",
        help="write model activations to an on-disk cache",
        description="Run a transformers model over text and store the activations at a hook "
        "point as safetensors shards with a manifest; `train --source cache` streams them.",
    )
    cache.add_argument(
        "--model", required=True, help="transformers model name or folder, or minilm"
    )
    cache.add_argument("--hook", required=True, help="hook point, e.g. resid_post.3")
    cache.add_argument("--out", required=True, help="cache folder to write")
    cache.add_argument("--tokens", type=integer, required=True, help="activations to store")
    cache.add_argument("--text", default="stdlib", help="'stdlib', a .txt or a .jsonl file")
    cache.add_argument("--context-size", type=integer, default=128, help="tokens per window")
    cache.add_argument("--batch-size", type=integer, default=32, help="windows per forward")
    cache.add_argument("--shard-rows", type=integer, default=65536, help="activations per shard")
    cache.add_argument("--dtype", default="float32", choices=ACTIVATION_DTYPES, help="stored")
    cache.add_argument(
        "--model-dtype",
        choices=ACTIVATION_DTYPES,
        help="dtype to load the model in (default: its own)",
    )
    cache.add_argument("--device", default="auto", help="device to run the model on")
    cache.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..files import check_unlocked
    from ..sources import cache_from_model, load_model, read_manifest
    from ..sources.cache import CACHE_LOCK, DTYPES, check_new_cache
    from ..training.config import resolve_device
    from ..validation import parse_dtype

    # What fails fast, before the model loads: the text, the folder, the sizes.
    check_text(args.text, "--text")
    check_new_cache(args.out)
    check_unlocked(args.out, CACHE_LOCK)
    check_counts(args, "tokens", "context_size", "batch_size", "shard_rows")
    device = resolve_device(check_device(args.device, "--device"))
    model_dtype = parse_dtype(args.model_dtype) if args.model_dtype else None
    model, tokenizer = load_model(args.model, device, model_dtype)
    folder = cache_from_model(
        args.out,
        model,
        tokenizer,
        args.hook,
        args.text,
        tokens=args.tokens,
        context_size=args.context_size,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        dtype=DTYPES[args.dtype],
        device=device,
    )
    rows = read_manifest(folder)["rows"]  # fewer than --tokens when the text ran out
    print(f"wrote {rows} activations of {args.model} at {args.hook} to {folder}")
    return 0
