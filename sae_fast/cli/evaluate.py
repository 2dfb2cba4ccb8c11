"""`sae-fast eval`: evaluate a trained SAE on held-out activations."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ..options import integer
from ..training.config import ConfigError, TrainConfig, check_device
from .common import (
    TRAINING_ONLY,
    SubParser,
    add_config_arguments,
    add_sae_pass_arguments,
    check_text,
    given_options,
    recorded_data_options,
)
from .summary import add_json_argument, metric_table, show, table

if TYPE_CHECKING:
    import torch


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    ev = sub(
        "eval",
        help="evaluate a trained SAE or cross-layer transcoder on held-out activations",
        description="MSE, FVU, L0, dead and dense fractions and SAEBench's core metrics on "
        "held-out activations; with --ce, the next-token loss and KL divergence of a causal "
        "LM with the SAE spliced in at the hook point, against the clean and the "
        "zero-ablated model. For a cross-layer transcoder: FVU, MSE, L0 and the dead "
        "fraction per target layer, at the model and hook points it records.",
    )
    add_sae_pass_arguments(ev, "activations to evaluate on")
    ev.add_argument(
        "--seed",
        type=integer,
        help="the training run's seed (default: the SAE's recorded one, else 0): for synthetic "
        "data it fixes the true dictionary (the rows evaluated on are others than the run's)",
    )
    ev.add_argument("--ce", action="store_true", help="also CE loss recovered (causal LMs)")
    ev.add_argument("--ce-windows", type=integer, default=64, help="text windows for --ce")
    ev.add_argument("--out", help="also write the results to this JSON file")
    add_json_argument(ev)
    add_config_arguments(ev, ("data",), omit=TRAINING_ONLY)
    ev.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .. import formats
    from ..analysis.evaluate import (
        ce_loss_recovered,
        check_causal_lm,
        density_histogram,
        evaluate_with_frequencies,
    )
    from ..sae import SparseAutoencoder
    from ..sources import build_source
    from ..training.config import resolve_device

    device = resolve_device(check_device(args.device, "--device"))
    if formats.kind_of(args.sae) == "clt":
        return _evaluate_clt(args, device)
    sae = SparseAutoencoder.load(args.sae, device=device)
    given = given_options(args, ("data",)) | ({"seed": args.seed} if args.seed is not None else {})
    options = recorded_data_options(sae.provenance, given)
    cfg = TrainConfig.from_dict(options, where="the data options")
    if cfg.source == "model":
        check_held_out(sae.provenance, given.get("text"))
    if args.ce and cfg.source != "model":
        raise ConfigError("--ce needs source=model (a causal LM and its hook point)")
    if args.ce and cfg.crosscoder:
        raise ConfigError(
            "--ce splices an SAE into one hook point; a crosscoder reads several (its sources "
            "side by side): evaluate it without --ce"
        )
    source = build_source(cfg, device, held_out=True)
    if args.ce:
        check_causal_lm(source.model)  # before the evaluation, not after it
    result, freq = evaluate_with_frequencies(sae, source, args.tokens, args.batch_size)
    result["feature_density_histogram"] = density_histogram(freq)
    if args.ce:
        result |= ce_loss_recovered(
            source.model,
            source.tokenizer,
            cfg.hook_out if sae.transcoder else cfg.hook,
            sae,
            cfg.text,
            cfg.context_size,
            cfg.model_batch_size,
            args.ce_windows,
            hook_in=cfg.hook_in if sae.transcoder else None,
        )
    histogram = "(the latents by log10 firing frequency: --json or --out)"
    show(args, result, f"{metric_table(result)}\n{histogram}")
    _write_out(args, result)
    return 0


def _evaluate_clt(args: argparse.Namespace, device: torch.device) -> int:
    """A cross-layer transcoder's held-out FVU, MSE, L0 and dead fraction per target layer,
    on --tokens tokens of --text at the model and hook points it records (or --model)."""
    from ..analysis.clt_eval import clt_activations, clt_metrics
    from ..clt import CrossLayerTranscoder
    from ..sources import documents

    if args.ce:
        raise ConfigError("--ce: CE loss recovered is for SAEs; not for a cross-layer transcoder")
    clt = CrossLayerTranscoder.load(args.sae, device=device)
    if args.text is None:
        raise ConfigError("--text: give held-out text to evaluate the cross-layer transcoder on")
    check_text(args.text, "--text")
    x, y = clt_activations(clt, documents(args.text), args.tokens, args.model)
    if y is None:
        raise ConfigError(
            "--sae: the cross-layer transcoder does not record the hook points it predicts "
            "(provenance hooks_out)"
        )
    result = clt_metrics(clt, x, y, args.batch_size)
    names = ("fvu", "mse", "l0", "dead_fraction")
    rows = [{"layer": t, **{k: result[k][t] for k in names}} for t in range(clt.n_layers)]
    show(args, result, f"{table(rows, ('layer', *names))}\n({result['tokens']} held-out tokens)")
    _write_out(args, result)
    return 0


def _write_out(args: argparse.Namespace, result: dict) -> None:
    """--out: the results as a JSON file, written atomically."""
    if args.out:
        from ..files import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


def check_held_out(provenance: dict, text: str | None) -> None:
    """Refuse an evaluation of model activations without --text (the default text may be
    the training text: the demo's is), and warn where --text is the text the SAE was
    trained on: neither is held out."""
    trained = (provenance.get("train") or {}).get("text") or provenance.get("text")
    on = f" (this SAE was trained on {trained!r})" if trained else ""
    if text is None:
        raise ConfigError(f"--text: give held-out text to evaluate on{on}")
    if trained and (text == trained or os.path.realpath(text) == os.path.realpath(trained)):
        print(
            f"sae-fast: warning: --text {text} is the text this SAE was trained on: these "
            "figures are not held out",
            file=sys.stderr,
        )
