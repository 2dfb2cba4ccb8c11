"""`sae-fast layers`: compare the SAEs of a multi-hook run (train --hooks) layer by layer, or a
cross-layer transcoder's layers (train --clt)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import integer
from ..training.config import ConfigError, TrainConfig, check_device
from .common import SubParser, check_text
from .summary import add_json_argument, show, table


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    layers = sub(
        "layers",
        help="compare the SAEs of a multi-hook run (train --hooks) layer by layer, or a "
        "cross-layer transcoder's layers",
        description="Write layers.html, layers.png and layers.json in a multi-hook run folder: "
        "FVU, 1 - FVU, L0, dead and dense fractions per hook point and, for a "
        "causal LM, the CE loss score. From each SAE's training metrics, or with --text "
        "evaluated on that held-out text (every SAE on the same tokens, from one model pass). "
        "In a cross-layer transcoder's run (train --clt): per layer, its output's FVU and its "
        "features' L0 (and, with --text, dead fraction).",
    )
    layers.add_argument(
        "run", help="multi-hook run folder (the --out-dir of train --hooks or train --clt)"
    )
    layers.add_argument("--text", help="held-out text to evaluate on (default: training metrics)")
    layers.add_argument("--tokens", type=integer, default=32768, help="tokens to evaluate on")
    layers.add_argument("--batch-size", type=integer, default=4096, help="activations per batch")
    layers.add_argument("--ce-windows", type=integer, default=64, help="text windows for CE")
    layers.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    add_json_argument(layers)
    layers.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.layers import (
        TRAINING_NOTE,
        clt_layers,
        evaluated_rows,
        load_saes,
        training_rows,
        write_layer_report,
    )

    run = Path(args.run)
    layers = clt_layers(run)
    if layers is not None:
        rows, about = _clt_rows(args, run, layers)
    elif args.text is None:
        rows, about = training_rows(run), TRAINING_NOTE
    else:
        from ..sources import build_source
        from ..training.checkpoints import RUN_CONFIG_FILE
        from ..training.config import resolve_device

        check_text(args.text, "--text")
        device = resolve_device(check_device(args.device, "--device"))
        saes = load_saes(run, device)
        cfg = TrainConfig.from_file(run / RUN_CONFIG_FILE, text=args.text, out_dir=str(run))
        source = build_source(cfg, device)
        rows = evaluated_rows(saes, source, args.tokens, args.batch_size, args.ce_windows)
        ce = f"; CE loss score over {args.ce_windows} windows" if "ce_loss_score" in rows[0] else ""
        about = (
            f"Held out: the same {rows[0]['tokens']:,} tokens of {args.text} for every SAE, "
            f"from one model pass (dead: never fired on those tokens{ce})."
        )
    report = write_layer_report(run, rows, about)[-1]
    numbers = [k for k, v in rows[0].items() if isinstance(v, float)]
    show(args, rows, table(rows, ("hook", *numbers)))
    print(f"layer sweep report: {report}")
    return 0


def _clt_rows(args: argparse.Namespace, run: Path, layers: list[int]) -> tuple[list[dict], str]:
    """(rows, about) of a cross-layer transcoder's run: per layer, from training or held out."""
    from ..analysis.layers import CLT_TRAINING_NOTE, clt_evaluated_rows, clt_training_rows

    if args.text is None:
        return clt_training_rows(run, layers), CLT_TRAINING_NOTE
    from ..analysis.clt_eval import clt_activations, clt_metrics
    from ..clt import CrossLayerTranscoder
    from ..sources import documents
    from ..training.checkpoints import SAE_DIR
    from ..training.config import resolve_device

    check_text(args.text, "--text")
    device = resolve_device(check_device(args.device, "--device"))
    if not (run / SAE_DIR).is_dir():
        raise ConfigError(f"{run} has no trained CLT yet ({SAE_DIR}/): finish the run")
    clt = CrossLayerTranscoder.load(run / SAE_DIR, device=device)
    x, y = clt_activations(clt, documents(args.text), args.tokens)
    if y is None:
        raise ConfigError(f"{run / SAE_DIR} records no output hook points (hooks_out)")
    metrics = clt_metrics(clt, x, y, args.batch_size)
    about = (
        f"Held out: {metrics['tokens']:,} tokens of {args.text}, every layer from one model "
        "pass (FVU of the layer's output; L0 and dead: the layer's features, dead when they "
        "never fired on those tokens)."
    )
    return clt_evaluated_rows(metrics, layers), about
