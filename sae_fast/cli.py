"""The `sae-fast` command: train, cache, eval, drift, compare, explain, dashboard, report,
layers, demo, toy, convert and inspect.

Errors a user can fix (bad options, missing or damaged files, a folder in use, a hook point
the model lacks, widths that disagree) print one line and exit with code 2; training that
diverges exits with 1; Ctrl-C during training saves a checkpoint and exits with 130
(elsewhere it just exits with 130). The parser needs no torch: `--help` answers at once, and
each command imports what it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from .options import (
    ACTIVATION_DTYPES,
    ADAM_MOMENTS,
    AUTOCAST_DTYPES,
    HELD_OUT,
    decimal,
    integer,
    is_natural,
)
from .training.config import ConfigError, TrainConfig, check_device, field_type
from .version import VERSION

_GROUPS = {
    "data": "activations",
    "sae": "the SAE",
    "optim": "optimisation",
    "sparsity": "sparsity and dead latents",
    "parallel": "distributed training (torchrun --nproc-per-node P -m sae_fast train ...)",
    "output": "output",
}


def add_config_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    """One --flag per TrainConfig field in groups, with its help text and default."""
    sections = {g: parser.add_argument_group(_GROUPS[g]) for g in groups}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata["group"]
        if group not in sections:
            continue
        kind, _ = field_type(f)
        parse = {int: integer, float: decimal}.get(kind, kind)
        flag = "--" + f.name.replace("_", "-")
        # None means a derived default, which the help text describes.
        shown = "" if f.default is None else f" (default: {f.default})"
        # argparse %-formats help texts: a literal % must be doubled.
        text = f"{f.metadata['help']}{shown}".replace("%", "%%")
        if kind is bool:
            sections[group].add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            sections[group].add_argument(
                flag, type=parse, default=None, choices=f.metadata["choices"], help=text
            )


def given_options(args: argparse.Namespace, groups: tuple[str, ...]) -> dict:
    """The TrainConfig options of groups given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] in groups}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(args: argparse.Namespace, groups: tuple[str, ...]) -> TrainConfig:
    """TrainConfig from --config (or, for --resume, the run's own options) and the flags
    given, which win."""
    given = given_options(args, groups)
    if getattr(args, "config", None):
        return TrainConfig.from_file(args.config, **given)
    if getattr(args, "resume", None):
        return _resumed_config(args.resume, given)
    return TrainConfig(**given)


def _resumed_config(resume: bool | str, given: dict) -> TrainConfig:
    """The options of the run that --resume continues (its config.json), then the flags.

    --resume alone names the run by --out-dir; --resume CHECKPOINT by the run folder the
    checkpoint is in, or by the options recorded in the checkpoint's cfg.json (then the new
    run needs its own --out-dir: the recorded one may be another run's).
    """
    from .files import read_json
    from .training.checkpoints import CHECKPOINTS_DIR, RUN_CONFIG_FILE

    if resume is True:
        run = Path(given.get("out_dir", TrainConfig.out_dir))
    else:
        checkpoint = Path(resume)
        run = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else None
        if run is None or not (run / RUN_CONFIG_FILE).exists():
            cfg = read_json(checkpoint / "cfg.json", ConfigError)
            train = (cfg.get("provenance") or {}).get("train") if isinstance(cfg, dict) else None
            if not isinstance(train, dict):
                raise ConfigError(
                    f"--resume: {checkpoint} records no training options; give them with "
                    "--config or the flags"
                )
            if "out_dir" not in given:
                raise ConfigError(
                    f"--resume: {checkpoint} is not in a run folder; give --out-dir for the "
                    "run that continues it"
                )
            return TrainConfig.from_dict({**train, **given}, where=str(checkpoint))
    if not (run / RUN_CONFIG_FILE).exists():
        raise ConfigError(
            f"--resume: {run} holds no run to continue (no {RUN_CONFIG_FILE}); give the "
            "run's --out-dir"
        )
    return TrainConfig.from_file(run / RUN_CONFIG_FILE, **{"out_dir": str(run), **given})


# --- commands ------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .training import Trainer
    from .training.checkpoints import SAE_DIR
    from .training.config import resolve_device
    from .training.layout import (
        DistributedRunError,
        build_rank_source,
        close_layout,
        init_layout,
        is_collective_failure,
        launched,
        local_device,
    )
    from .training.trainer import check_run_folder

    cfg = config_from_args(args, tuple(_GROUPS))
    # What fails fast, before a model or cache loads (10-90 s): the text, the run folder.
    if cfg.source == "model":
        check_text(cfg.text, "--text")
    if cfg.hooks is None:
        check_run_folder(Path(cfg.out_dir), args.resume, probe_lock=not launched())
    device = resolve_device(local_device(cfg.device))
    layout = init_layout(cfg, device)
    if cfg.hooks is not None:
        return _train_hooks(cfg, args.resume or False, layout, device)
    finished = False
    try:
        source = build_rank_source(cfg, device, layout)
        result = Trainer(cfg, source, resume=args.resume or False, layout=layout).train()
        finished = True
    except RuntimeError as e:
        if not (layout.distributed and is_collective_failure(e)):
            raise
        first = str(e).strip().splitlines()[0]
        raise DistributedRunError(
            f"rank {layout.rank}: another process of the run stopped or did not answer "
            f"within dist_timeout={cfg.dist_timeout:g} s ({first}); the last complete "
            f"checkpoint in {cfg.out_dir} resumes with --resume"
        ) from None
    finally:
        close_layout(layout, finished)
    if not layout.main:
        return 130 if result.interrupted else 0
    print(json.dumps({"step": result.step, **result.final}, indent=2))
    if result.interrupted:
        return _interrupted(result.step, cfg.out_dir)
    print(f"saved the SAE to {result.out_dir / SAE_DIR}")
    return 0


def _interrupted(step: int, out_dir: str) -> int:
    """Say how to continue a run stopped by Ctrl-C at step; its exit code."""
    print(
        f"interrupted at step {step}; continue with: sae-fast train --resume "
        f"--out-dir {shlex.quote(out_dir)}"
    )
    return 130


def _train_hooks(cfg: TrainConfig, resume: bool | str, layout, device) -> int:
    """cmd_train for hooks: one SAE per hook point from one model pass, then the layer
    sweep report of their training metrics."""
    from .training import MultiTrainer
    from .training.layout import close_layout

    finished = False
    try:
        if layout.distributed:  # before the model loads on every process
            raise ConfigError("--hooks trains in one process: run it without torchrun")
        from .sources import build_source

        source = build_source(cfg, device)
        results = MultiTrainer(cfg, source, resume=resume, layout=layout).train()
        finished = True
    finally:
        close_layout(layout, finished)
    print(json.dumps({r.out_dir.name: {"step": r.step, **r.final} for r in results}, indent=2))
    if any(r.interrupted for r in results):
        return _interrupted(results[0].step, cfg.out_dir)
    print(f"saved the SAEs to {Path(cfg.out_dir)}/HOOK/sae for the hooks {cfg.hooks}")
    if cfg.plots:
        from .analysis.layers import TRAINING_NOTE, training_rows, write_layer_report

        hint = f"sae-fast layers {shlex.quote(cfg.out_dir)} --text FILE"
        about = f"{TRAINING_NOTE} Held-out numbers: {hint}"
        report = write_layer_report(cfg.out_dir, training_rows(cfg.out_dir), about)[-1]
        print(f"layer sweep report: {report}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .sources import split_documents

    check_text(args.text, "text")
    paths = split_documents(args.text, args.out, args.held_out)
    counts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            counts.append(sum(1 for _ in f))
    print(f"wrote {paths[0]} ({counts[0]} documents) and {paths[1]} ({counts[1]} held out)")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .sources import cache_from_model, load_model, read_manifest
    from .sources.cache import DTYPES
    from .training.config import resolve_device
    from .validation import parse_dtype

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


def recorded_data_options(provenance: dict, given: dict) -> dict:
    """The data options an SAE was trained on (its provenance), under those given.

    Warns, on stderr, where a given model or hook point differs from the recorded one: an SAE
    of the same width at another layer evaluates without an error, and wrongly.
    """
    train = provenance.get("train") or {}
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == "data"}
    # Not the text: evaluating on the training text would not be held out (give --text).
    recorded = {k: v for k, v in train.items() if k in names and k != "text" and v is not None}
    if "seed" in train:  # for synthetic data it names the true dictionary
        recorded["seed"] = train["seed"]
    for key in ("model", "hook", "hook_in", "hook_out"):
        if key not in recorded and provenance.get(key):  # another library's record
            recorded[key] = provenance[key]
            recorded.setdefault("source", "model")
    if "source" in given and given["source"] != recorded.get("source"):
        recorded = {}  # another kind of data: nothing recorded applies
    for key in ("model", "hook"):
        if key in given and key in recorded and given[key] != recorded[key]:
            print(
                f"sae-fast: warning: this SAE was trained with {key}={recorded[key]!r}, not "
                f"{given[key]!r}",
                file=sys.stderr,
            )
    return {**recorded, **given}


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


def cmd_eval(args: argparse.Namespace) -> int:
    from .analysis.evaluate import (
        ce_loss_recovered,
        check_causal_lm,
        density_histogram,
        evaluate_with_frequencies,
    )
    from .sae import SparseAutoencoder
    from .sources import build_source
    from .training.config import resolve_device

    device = resolve_device(check_device(args.device, "--device"))
    sae = SparseAutoencoder.load(args.sae, device=device)
    given = given_options(args, ("data",)) | ({"seed": args.seed} if args.seed is not None else {})
    options = recorded_data_options(sae.provenance, given)
    cfg = TrainConfig.from_dict(options, where="the data options")
    if cfg.source == "model":
        check_held_out(sae.provenance, given.get("text"))
    if args.ce and cfg.source != "model":
        raise ConfigError("--ce needs source=model (a causal LM and its hook point)")
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
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from .files import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from .analysis.drift import feature_drift
    from .analysis.evaluate import evaluate_with_frequencies
    from .sae import SparseAutoencoder
    from .sources import build_source
    from .sources.factory import model_source
    from .training.config import resolve_device
    from .validation import check_int

    check_int(args.top, "--top", error=ConfigError)
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
        from .analysis.dashboard_html import FILES
        from .files import check_replaceable

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
    print(
        f"{report['appeared']} latents appear and {report['vanished']} vanish from A to B "
        f"(of {sae.n_latents}, FDR {args.alpha}); Jensen-Shannon divergence "
        f"{report['js_divergence']:.4f}"
    )
    for row in report["top"]:
        print(
            f"  latent {row['latent']:>6}  {row['direction']:<8}  {row['freq_a']:.4f} -> "
            f"{row['freq_b']:.4f}  z {row['z']:+.1f}"
        )
    if args.dashboard:
        _drift_dashboards(args, sae, cfg, source, report)
    if args.out:
        from .files import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def check_text(text: str, flag: str) -> None:
    """A documents spec names a file or 'stdlib'; else ConfigError naming flag."""
    if text != "stdlib" and not Path(text).is_file():
        raise ConfigError(f"{flag}: {text} is not a file")


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

    from .analysis.compare import THRESHOLDS, pair_cosines
    from .analysis.correlation import ActivationCorrelation
    from .analysis.dashboard import write_feature_dashboard
    from .analysis.dashboard_html import write_pairs_page
    from .analysis.feature_stats import FeatureStats, text_batches
    from .sae import eval_mode

    if chosen is None:
        chosen = list(dict.fromkeys((r["a"], r["b"]) for r in report["best"] + report["worst"]))
    cfg, model, tokenizer, context_size = _model_for_sae(args, a)
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
        _token_bar(args) as bar,
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


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.compare import match_decoders, plot_cosines, shared_initialisation
    from .analysis.dashboard_html import FILES as DASHBOARD_FILES
    from .files import atomic_path, check_replaceable
    from .sae import SparseAutoencoder
    from .training.config import resolve_device
    from .validation import check_int

    check_int(args.top, "--top", error=ConfigError)
    if args.tokens is not None:
        check_int(args.tokens, "--tokens", error=ConfigError)
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


def cmd_explain(args: argparse.Namespace) -> int:
    from .analysis.explain import explain_html, explain_text, feature_text, summaries
    from .analysis.features import collect_activations
    from .files import atomic_path
    from .sae import SparseAutoencoder
    from .training.config import resolve_device
    from .validation import check_int

    for name in ("top", "context_tokens"):
        check_int(getattr(args, name), f"--{name.replace('_', '-')}", error=ConfigError)
    if not args.text.strip():
        raise ConfigError("text: give the text to explain")
    device = resolve_device(check_device(args.device, "--device"))
    sae = SparseAutoencoder.load(args.sae, device=device)
    cfg, model, tokenizer, context_size = _model_for_sae(args, sae)
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
        with atomic_path(args.html) as tmp:
            tmp.write_text(explain_html(rows, notes, f"{cfg.hook} of {cfg.model}"))
        print(f"wrote {args.html}")
    return 0


def _model_for_sae(args: argparse.Namespace, sae) -> tuple[TrainConfig, object, object, int]:
    """(cfg, model, tokenizer, context size) for a command that runs an SAE through a model:
    --model and --hook, else the SAE's recorded ones, checked against the SAE's width; the
    recorded context size, never longer than the model's positions."""
    from .sources import load_model
    from .sources.hooks import probe_hook
    from .validation import parse_dtype

    given = {k: v for k, v in (("model", args.model), ("hook", args.hook)) if v}
    options = _reading_input(sae, recorded_data_options(sae.provenance, given))
    if not options.get("model") or not options.get("hook"):
        raise ConfigError("--model and --hook: the SAE records none; give them")
    cfg = TrainConfig.from_dict({**options, "source": "model"}, where="the data options")
    dtype = parse_dtype(cfg.model_dtype) if cfg.model_dtype else None
    model, tokenizer = load_model(cfg.model, sae.W_dec.device, dtype)
    width = probe_hook(model, cfg.hook).shape[-1]
    if width != sae.d_in:
        raise ConfigError(
            f"{cfg.hook} of {cfg.model} has width {width}; the SAE's d_in is {sae.d_in}"
        )
    return cfg, model, tokenizer, _fit_context(model, cfg.context_size)


def _reading_input(sae, options: dict) -> dict:
    """Data options that read what sae encodes: a transcoder's input hook point alone (its
    latents come from it; a given --hook wins), a single hook point for any SAE."""
    if sae.transcoder:
        options = {**options, "hook": options.get("hook") or options.get("hook_in")}
    dropped = ("hooks", "hook_in", "hook_out", "skip_connection")
    return {k: v for k, v in options.items() if k not in dropped}


def _fit_context(model, context_size: int) -> int:
    """The recorded context size, never longer than the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None) or context_size
    return min(context_size, limit)


def _drift_dashboards(args: argparse.Namespace, sae, cfg: TrainConfig, source, report: dict):
    """Dashboards of the top movers over each corpus (DIR/a, DIR/b) and DIR/movers.html, each
    mover's two pages side by side."""
    import torch

    from .analysis.dashboard import build_dashboard
    from .analysis.dashboard_html import write_pairs_page

    out = Path(args.dashboard)
    out.mkdir(parents=True, exist_ok=True)
    movers = [row["latent"] for row in report["top"]]
    records = []
    context_size = _fit_context(source.model, cfg.context_size)
    for name, text in (("a", cfg.text), ("b", args.against)) if movers else ():
        # A transcoder's latents read its input hook point.
        hook = cfg.hook or cfg.hook_in
        about = {"sae": str(args.sae), "model": cfg.model, "hook": hook, "text": text}
        with _token_bar(args) as bar:
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


def cmd_dashboard(args: argparse.Namespace) -> int:
    import time

    from .analysis.dashboard import build_dashboard, pick_latents
    from .analysis.dashboard_html import FILES
    from .analysis.neuronpedia import check_set_name
    from .files import check_replaceable
    from .sae import SparseAutoencoder
    from .training.config import resolve_device
    from .validation import check_int

    check_int(args.batch_size, "--batch-size", error=ConfigError)
    if args.tokens is not None:
        check_int(args.tokens, "--tokens", error=ConfigError)
    check_text(args.text, "--text")
    check_replaceable(args.out, FILES)  # before the pass, not after it
    if args.neuronpedia is not None:
        try:
            check_set_name(args.neuronpedia)
        except ValueError as e:
            raise ConfigError(f"--neuronpedia: {e}") from None
    device = resolve_device(check_device(args.device, "--device"))
    sae = SparseAutoencoder.load(args.sae, device=device)
    try:
        features = pick_latents(args.features, sae.n_latents)
    except ValueError as e:
        raise ConfigError(f"--features: {e}") from None
    cfg, model, tokenizer, context_size = _model_for_sae(args, sae)
    about = {"sae": str(args.sae), "model": cfg.model, "hook": cfg.hook, "text": args.text}
    started = time.perf_counter()
    with _token_bar(args) as bar:
        meta, _ = build_dashboard(sae, model, tokenizer, args.out, about, features,
                               context_size=context_size, max_tokens=args.tokens,
                               batch_size=args.batch_size, progress=bar,
                               neuronpedia=args.neuronpedia)  # fmt: skip
    print(
        f"wrote {Path(args.out) / 'index.html'}: {meta['shown']} features over "
        f"{meta['tokens_seen']} tokens in {time.perf_counter() - started:.1f} s"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .apps.demo import run_demo

    summary = run_demo(
        args.out,
        text=args.text,
        steps=args.steps,
        n_latents=args.n_latents,
        k=args.k,
        hook=args.hook,
        progress=args.progress,
    )
    return 130 if summary.get("interrupted") else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .apps.report import write_run_report

    check_device(args.device, "--device")
    path = write_run_report(
        args.run,
        text=args.text,
        tokens=args.tokens,
        n_features=args.features,
        device=args.device,
        out=args.out,
    )
    print(f"report: {path}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from .analysis.layers import (
        TRAINING_NOTE,
        evaluated_rows,
        load_saes,
        training_rows,
        write_layer_report,
    )

    run = Path(args.run)
    if args.text is None:
        rows, about = training_rows(run), TRAINING_NOTE
    else:
        from .sources import build_source
        from .training.checkpoints import RUN_CONFIG_FILE
        from .training.config import resolve_device

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
    for row in rows:
        cells = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['hook']}: {cells}")
    print(f"layer sweep report: {write_layer_report(run, rows, about)[-1]}")
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from .apps.toy import run_toy

    run_toy(args.out, steps=args.steps)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .sae import SparseAutoencoder

    sae = SparseAutoencoder.load(args.src, format=args.source_format)
    sae.save(args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to}) from {args.src}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import formats
    from .analysis.summary import summarize
    from .sae import SparseAutoencoder

    fmt = args.format or formats.detect(args.path)
    sae = SparseAutoencoder.load(args.path, format=fmt)
    print(json.dumps({"path": str(args.path), "format": fmt, **summarize(sae)}, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .training import roofline
    from .validation import check_int

    for flag in ("d_in", "n_latents", "k", "batch_size", "gpus"):
        check_int(getattr(args, flag), f"--{flag.replace('_', '-')}", error=ConfigError)
    check_int(args.init_tokens, "--init-tokens", minimum=0, error=ConfigError)
    if args.k > args.n_latents:
        raise ConfigError(f"--k={args.k} is larger than --n-latents={args.n_latents}")
    shape = roofline.Shape(
        n=args.batch_size, d=args.d_in, m=args.n_latents, k=args.k, dtype=args.dtype,
        compute_dtype=AUTOCAST_DTYPES[args.autocast], moments=args.adam_moments,
        init_tokens=args.init_tokens,
    )  # fmt: skip
    cpu_bytes = None
    if args.gpu == "cpu":
        import torch

        from .validation import device_memory

        cpu_bytes = device_memory(torch.device("cpu"))
    result = roofline.plan(shape, args.gpus, args.gpu, cpu_bytes)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gib = 2**30
    print(
        f"d_in={shape.d} n_latents={shape.m} k={shape.k} batch={shape.n} {shape.dtype} "
        f"(compute {shape.compute_dtype or shape.dtype}, Adam moments {shape.moments}) on "
        f"{args.gpus} x {args.gpu}: {result['capacity'] / gib:.1f} GiB usable per device"
    )
    if "gemm_ms" in result:
        low, high = result["predicted_x_gemm"]
        print(
            f"predicted step {low:.2f}-{high:.2f}x the encoder GEMM "
            f"({result['gemm_ms'][0]:.2f}-{result['gemm_ms'][1]:.2f} ms) on one GPU "
            "(a roofline, not a measurement: README > Planning a run)"
        )
    head = "data x latent | params | grads | Adam | step | checkpoint | total GiB | fits"
    print(head + (" | step ms" if "gemm_ms" in result else "") + " | largest n_latents")
    for row in result["layouts"]:
        mem = row["memory"]
        step = mem["activations"] + mem["buffers"]
        cells = [f"{row['data']} x {row['latent']}"] + [
            f"{v / gib:.2f}" for v in (mem["parameters"], mem["gradients"], mem["optimizer"],
                                       step, mem["checkpoint"], mem["total"])
        ] + ["yes" if row["fits"] else "NO"]  # fmt: skip
        if "step_ms" in row:
            cells.append(f"{row['step_ms'][0]:.1f}-{row['step_ms'][1]:.1f}")
        print(" | ".join([*cells, f"{row['largest_n_latents']:,}"]))
    return 0


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or the help gives it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A parser whose errors print a one-line usage (positionals, then [options]) and the
    error last: the nearest flag's hint is the line a user reads, not 40 lines of usage."""

    def error(self, message: str) -> NoReturn:
        positionals = [a.metavar or a.dest for a in self._actions if not a.option_strings]
        usage = " ".join([self.prog, *map(str, positionals), "[options]"])
        self.exit(2, f"usage: {usage} (--help lists them)\n{self.prog}: error: {message}\n")


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """The error for arguments parser does not know, with the nearest flag of each."""
    flags = [f for action in parser._actions for f in action.option_strings]
    parts = []
    for arg in extra:
        near = difflib.get_close_matches(arg.split("=")[0], flags, n=1) if arg[:1] == "-" else []
        parts.append(f"{arg} (did you mean {near[0]}?)" if near else arg)
    return "unrecognized arguments: " + " ".join(parts)


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether torch raised e for an allocation that does not fit (CPU or GPU)."""
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sae-fast",
        description="Train, cache, evaluate, report and demo sparse autoencoders.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sae-fast {VERSION}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def sub(name: str, **kw) -> argparse.ArgumentParser:
        command = commands.add_parser(name, formatter_class=_Formatter, allow_abbrev=False, **kw)
        command.set_defaults(parser=command)
        return command

    train = sub(
        "train",
        help="train an SAE",
        description="Train an SAE on model activations, a cache or synthetic data. Options "
        "come from --config (JSON or TOML, same names with underscores) and the flags, which "
        "win over the file.",
    )
    train.add_argument("--config", help="JSON or TOML file of options")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="continue the run in --out-dir from its newest checkpoint, or from the "
        "checkpoint folder given",
    )
    add_config_arguments(train, tuple(_GROUPS))
    train.set_defaults(fn=cmd_train)

    split = sub(
        "split",
        help="split a text into training and held-out documents",
        description="Write DIR/train.jsonl and DIR/heldout.jsonl from a text's documents, a "
        "--held-out fraction of them held out, spread evenly through the text (0.1: documents "
        "0, 10, 20, ...), for train --text and eval/layers/dashboard --text.",
    )
    split.add_argument("text", help="'stdlib', a .txt or a .jsonl file")
    split.add_argument("--held-out", type=decimal, default=HELD_OUT, help="fraction held out")
    split.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    split.set_defaults(fn=cmd_split)

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
    cache.set_defaults(fn=cmd_cache)

    ev = sub(
        "eval",
        help="evaluate a trained SAE on held-out activations",
        description="MSE, FVU, L0, dead and dense fractions and SAEBench's core metrics on "
        "held-out activations; with --ce, the next-token loss and KL divergence of a causal "
        "LM with the SAE spliced in at the hook point, against the clean and the "
        "zero-ablated model.",
    )
    _add_sae_pass_arguments(ev, "activations to evaluate on")
    ev.add_argument(
        "--seed",
        type=integer,
        help="the training run's seed (default: the SAE's recorded one, else 0): for synthetic "
        "data it fixes the true dictionary (the rows evaluated on are others than the run's)",
    )
    ev.add_argument("--ce", action="store_true", help="also CE loss recovered (causal LMs)")
    ev.add_argument("--ce-windows", type=integer, default=64, help="text windows for --ce")
    ev.add_argument("--out", help="also write the results to this JSON file")
    add_config_arguments(ev, ("data",))
    ev.set_defaults(fn=cmd_eval)

    dr = sub(
        "drift",
        help="which latents fire more or less often on one text than on another",
        description="Each latent's firing frequency on --text (A) and on --against (B), "
        "through the model at the hook point (the SAE's recorded ones by default); the "
        "latents whose rates differ by a two-proportion z-test after a Benjamini-Hochberg "
        "correction, and the Jensen-Shannon divergence of the firing shares.",
    )
    _add_sae_pass_arguments(dr, "activations per corpus")
    dr.add_argument("--against", required=True, help="corpus B (the same kinds as --text)")
    dr.add_argument("--alpha", type=decimal, default=0.01, help="false discovery rate")
    dr.add_argument("--top", type=integer, default=20, help="movers to list")
    dr.add_argument("--out", help="also write the report to this JSON file")
    dr.add_argument(
        "--dashboard",
        help="folder for the top movers' dashboards on A (a/) and B (b/) and "
        "movers.html, each mover's pages side by side",
    )
    _add_progress_argument(dr)
    add_config_arguments(dr, ("data",))
    dr.set_defaults(fn=cmd_drift)

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
    _add_model_arguments(cmp, "A's recorded one; with --text")
    cmp.add_argument("--tokens", type=integer, help="with --text: tokens to read (default: all)")
    cmp.add_argument(
        "--pairs",
        help="with --text and --out: the pairs A:B to show side by side, like "
        "3:17,5:9 (default: the best and worst decoder matches)",
    )
    cmp.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    _add_progress_argument(cmp)
    cmp.add_argument(
        "--out",
        help="folder for compare.json and cosines.png; with --text also dashboards of "
        "the chosen pairs' latents (a/, b/) and pairs.html, the pairs side by side",
    )
    cmp.set_defaults(fn=cmd_compare)

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
    _add_model_arguments(ex, "the SAE's recorded one")
    ex.add_argument("--top", type=integer, default=5, help="latents per token")
    ex.add_argument("--contexts", help="reference text for the latents' summaries")
    ex.add_argument("--context-tokens", type=integer, default=20000, help="tokens of --contexts")
    ex.add_argument("--html", help="also write an HTML view here")
    ex.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    ex.set_defaults(fn=cmd_explain)

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
    dash.add_argument("--sae", required=True, help="SAE folder")
    dash.add_argument("--text", required=True, help="'stdlib', a .txt or a .jsonl file")
    dash.add_argument("--out", required=True, help="dashboard folder (replaced whole)")
    _add_model_arguments(dash, "the SAE's recorded one")
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
    _add_progress_argument(dash)
    dash.set_defaults(fn=cmd_dashboard)

    demo = sub(
        "demo",
        help="train a TopK SAE on all-MiniLM-L6-v2 activations, offline, in minutes",
        description="Train a TopK SAE on the residual stream of the packaged all-MiniLM-L6-v2 "
        "over Python's standard-library docstrings (or --text), evaluate it on held-out "
        "documents, save it and write report.html with training curves and the contexts "
        "that activate a handful of features most.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--text", default="stdlib", help="'stdlib', a .txt or a .jsonl file")
    demo.add_argument("--steps", type=integer, default=600, help="optimizer steps")
    demo.add_argument("--n-latents", type=integer, default=3072, help="dictionary size")
    demo.add_argument("--k", type=integer, default=32, help="active latents per token")
    demo.add_argument("--hook", default="resid_post.3", help="hook point of MiniLM")
    _add_progress_argument(demo)
    demo.set_defaults(fn=cmd_demo)

    report = sub(
        "report",
        help="write the demo's report (curves, histogram, feature contexts) for any run",
        description="Write report.html for a training run folder: its summary, training "
        "curves, the latent firing histogram and the top activating contexts of a few "
        "features, on the run's own model and text (or --text). A run without sae/ yet is "
        "reported from its newest checkpoint.",
    )
    report.add_argument("run", help="run folder (the --out-dir of sae-fast train)")
    report.add_argument("--text", help="text for the contexts (default: the run's own)")
    report.add_argument("--tokens", type=integer, default=32768, help="tokens to read")
    report.add_argument("--features", type=integer, default=8, help="feature cards")
    report.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    report.add_argument("--out", help="the HTML file (default: RUN/report.html)")
    report.set_defaults(fn=cmd_report)

    layers = sub(
        "layers",
        help="compare the SAEs of a multi-hook run (train --hooks) layer by layer",
        description="Write layers.html, layers.png and layers.json in a multi-hook run folder: "
        "FVU, 1 - FVU, L0, dead and dense fractions per hook point and, for a "
        "causal LM, the CE loss score. From each SAE's training metrics, or with --text "
        "evaluated on that held-out text (every SAE on the same tokens, from one model pass).",
    )
    layers.add_argument("run", help="multi-hook run folder (the --out-dir of train --hooks)")
    layers.add_argument("--text", help="held-out text to evaluate on (default: training metrics)")
    layers.add_argument("--tokens", type=integer, default=32768, help="tokens to evaluate on")
    layers.add_argument("--batch-size", type=integer, default=4096, help="activations per batch")
    layers.add_argument("--ce-windows", type=integer, default=64, help="text windows for CE")
    layers.add_argument("--device", default="auto", help="device (auto: cuda if available)")
    layers.set_defaults(fn=cmd_layers)

    toy = sub(
        "toy",
        help="reproduce the L1 and TopK sparsity trade-offs on the seed toy data",
        description="On the toy data (d=10, 24 true features, 3 active, noise 0.02): ReLU+L1 "
        "for rising L1 coefficients and TopK for k = 1..8; writes toy.json and the MSE vs L0 "
        "frontier as toy_frontier.png.",
    )
    toy.add_argument("--out", default="runs/toy", help="output folder")
    toy.add_argument("--steps", type=integer, default=1000, help="optimizer steps per SAE")
    toy.set_defaults(fn=cmd_toy)

    convert = sub(
        "convert",
        help="convert an SAE checkpoint between formats",
        description="Load an SAE in any format sae_fast reads (detected) and write it in "
        "another: sae_fast, saelens, sparsify, ...",
    )
    convert.add_argument("src", help="checkpoint to read (folder or file)")
    convert.add_argument("dst", help="where to write")
    convert.add_argument("--to", required=True, help="format to write")
    convert.add_argument("--from", dest="source_format", help="format of src (default: detect)")
    convert.set_defaults(fn=cmd_convert)

    inspect = sub(
        "inspect",
        help="print an SAE checkpoint's format, shapes, dtype, architecture and norms",
    )
    inspect.add_argument("path", help="checkpoint folder or file")
    inspect.add_argument("--format", help="format of path (default: detect)")
    inspect.set_defaults(fn=cmd_inspect)

    plan = sub(
        "plan",
        help="predict a training run's memory per device and step time, for each layout",
        description="From a roofline model (no GPU needed): for each way of splitting GPUS "
        "devices into data- and latent-parallel ranks, the memory per device (parameters, "
        "gradients, Adam's moments, a step's activations and buffers, a checkpoint's save), "
        "whether it fits, the largest dictionary that would, and the predicted step time.",
    )
    from .training import roofline  # torch-free: the device models

    defaults = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
    plan.add_argument("--d-in", type=integer, required=True, help="activation width")
    plan.add_argument("--n-latents", type=integer, required=True, help="dictionary size m")
    plan.add_argument("--k", type=integer, default=defaults.k, help="active latents per token")
    plan.add_argument("--batch-size", type=integer, default=defaults.batch_size,
                      help="tokens per step, over all data-parallel ranks")  # fmt: skip
    plan.add_argument("--init-tokens", type=integer, default=defaults.init_tokens,
                      help="activations drawn before training")  # fmt: skip
    plan.add_argument("--dtype", default=defaults.dtype, choices=ACTIVATION_DTYPES,
                      help="parameter dtype")  # fmt: skip
    plan.add_argument("--autocast", default=defaults.autocast, choices=tuple(AUTOCAST_DTYPES),
                      help="the step's compute dtype")  # fmt: skip
    plan.add_argument("--adam-moments", default=defaults.adam_moments, choices=ADAM_MOMENTS,
                      help="storage of Adam's moments")  # fmt: skip
    plan.add_argument("--gpus", type=integer, default=1, help="devices of the run")
    plan.add_argument("--gpu", default="h100", choices=(*roofline.GPUS, "cpu"),
                      help="the device model (cpu: this machine's memory, no time)")  # fmt: skip
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(fn=cmd_plan)
    return parser


def _add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress: a progress bar, on by default."""
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )


def _add_model_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """--model and --hook of a command that runs an SAE through a model (_model_for_sae)."""
    parser.add_argument("--model", help=f"transformers model (default: {default})")
    parser.add_argument("--hook", help=f"hook point (default: {default})")


def _token_bar(args: argparse.Namespace):
    """A tqdm bar over --tokens tokens (none given: open-ended), shown unless --no-progress."""
    from tqdm.auto import tqdm

    return tqdm(total=args.tokens, unit="tok", disable=not args.progress)


def _add_sae_pass_arguments(parser: argparse.ArgumentParser, tokens_help: str) -> None:
    """--sae, --tokens, --batch-size and --device of a command that runs an SAE over data."""
    parser.add_argument("--sae", required=True, help="SAE folder (sae.safetensors + cfg.json)")
    parser.add_argument("--tokens", type=integer, default=65536, help=tokens_help)
    parser.add_argument("--batch-size", type=integer, default=4096, help="activations per batch")
    parser.add_argument("--device", default="auto", help="device (auto: cuda if available)")


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # the subcommand's usage and the nearest flag, not the top-level usage
        args.parser.error(_unrecognized(args.parser, extra))
    from .analysis.feature_stats import FeatureStatsError
    from .backends import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .files import FolderInUseError
    from .sources import HookPointError, SourceError
    from .training import TrainingDivergedError
    from .training.layout import DistributedRunError

    user_errors = (
        ConfigError,
        SourceError,
        HookPointError,
        CheckpointError,
        BackendUnavailableError,
        FolderInUseError,
        FeatureStatsError,
        ImportError,
        OSError,
    )
    try:
        return args.fn(args)
    except user_errors as e:
        # An OSError we raised says what failed in its strerror; the system's name a file.
        said = e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else e
        print(f"sae-fast {args.command}: error: {said}", file=sys.stderr)
        return 2
    except (TrainingDivergedError, DistributedRunError) as e:
        print(f"sae-fast {args.command}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # an allocation the size checks did not foresee
        if not _out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0]
        print(
            f"sae-fast {args.command}: error: out of memory ({first}); lower the sizes "
            "(--batch-size, --n-latents, --shuffle-buffer, ...)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:  # outside training, which stops cleanly by itself
        print(f"sae-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
