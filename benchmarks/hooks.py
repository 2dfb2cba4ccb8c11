"""Many SAEs from one model pass against one run per hook point, on the same tokens.

`python -m benchmarks hooks` trains one SAE per hook point (default: MiniLM's six
resid_post layers) twice: as one multi-hook run (sae_fast.training.MultiTrainer: the model
runs once per batch of windows, up to the deepest hook point) and as one single-hook run
per hook point (sae_fast.training.Trainer: each runs the model up to its own hook point).
Both see the same windows and shuffles, so the SAEs must come out equal bit for bit on
the CPU, which the benchmark checks. Timed: the wall clock from building the trainers
(the shuffle buffer's fill and the init tokens included; loading the model not) to the
end of training, the median over --repeats rounds that alternate the two ways; tokens/s
counts every SAE's tokens (steps x batch size x hook points) over that time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_fast.options import parse_hooks
from sae_fast.sources import load_model
from sae_fast.sources.factory import model_source
from sae_fast.training import MultiTrainer, TrainConfig, Trainer

from . import report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="transformers model (default: minilm)")
    parser.add_argument("--hooks", default="resid_post.0-5", help="hook points, as --hooks")
    parser.add_argument("--text", default="stdlib", help="text to run the model on")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per SAE")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    parser.add_argument("--n-latents", type=int, default=4096, help="latents per SAE")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--shuffle-buffer", type=int, default=8192, help="rows held")
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of both ways")


def _config(args: argparse.Namespace, out_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(
        source="model",
        model=args.model,
        text=args.text,
        n_latents=args.n_latents,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        shuffle_buffer=args.shuffle_buffer,
        context_size=args.context_size,
        init_tokens=args.batch_size,
        checkpoint_every=0,
        progress=False,
        plots=False,
        device="cpu",
        out_dir=str(out_dir),
        **kw,
    )


def _multi(args, model, tokenizer, hooks, out: Path) -> tuple[float, list]:
    cfg = _config(args, out, hooks=",".join(hooks))
    start = time.perf_counter()
    results = MultiTrainer(cfg, model_source(cfg, model, tokenizer, "cpu")).train()
    return time.perf_counter() - start, [r.sae for r in results]


def _singles(args, model, tokenizer, hooks, out: Path) -> tuple[float, list]:
    start, saes = time.perf_counter(), []
    for hook in hooks:
        cfg = _config(args, out / hook, hook=hook)
        saes.append(Trainer(cfg, model_source(cfg, model, tokenizer, "cpu")).train().sae)
    return time.perf_counter() - start, saes


def _equal(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa.state_dict().values(), sb.state_dict().values(), strict=True)
    )


def run(args: argparse.Namespace, progress) -> dict:
    """Both ways --repeats times; the record of the benchmark (module docstring)."""
    hooks = parse_hooks(args.hooks)
    model, tokenizer = load_model(args.model, "cpu")
    times: dict[str, list[float]] = {"multi": [], "single": []}
    equal = True
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for way, fn in (("multi", _multi), ("single", _singles)):
                seconds, saes = fn(args, model, tokenizer, hooks, Path(tmp) / f"{way}-{i}")
                times[way].append(seconds)
                progress(f"round {i + 1}/{args.repeats} {way}: {seconds:.1f} s")
                if way == "multi":
                    reference = saes
                else:
                    equal = equal and _equal(reference, saes)
    tokens = args.steps * args.batch_size * len(hooks)
    median = {way: statistics.median(values) for way, values in times.items()}
    names = ("model", "text", "steps", "batch_size", "n_latents", "k")
    names += ("shuffle_buffer", "context_size")
    cfg = dataclasses.asdict(_config(args, Path("-"), hooks=args.hooks))
    return {
        "benchmark": "hooks",
        "options": {
            **{n: getattr(args, n) for n in names},
            "repeats": args.repeats,
            "hooks": hooks,
        },
        "train": {k: v for k, v in cfg.items() if k != "out_dir"},
        "env": report.environment("cpu"),
        "seconds": times,
        "median_seconds": median,
        "sae_tokens": tokens,
        "tokens_per_s": {way: tokens / s for way, s in median.items()},
        "speedup": median["single"] / median["multi"],
        "bit_equal": equal,
    }


def markdown(result: dict) -> str:
    o, rate = result["options"], result["tokens_per_s"]
    return "\n".join(
        [
            f"# {len(o['hooks'])} SAEs of {o['model']} ({', '.join(o['hooks'])})",
            "",
            f"{o['steps']} steps x {o['batch_size']} tokens per SAE, m={o['n_latents']}, "
            f"k={o['k']}, CPU float32; median of {o['repeats']} rounds.",
            "",
            "| way | median s | SAE tokens/s |",
            "|---|---|---|",
            f"| one multi-hook run | {result['median_seconds']['multi']:.1f} | "
            f"{rate['multi']:,.0f} |",
            f"| {len(o['hooks'])} single-hook runs | {result['median_seconds']['single']:.1f} | "
            f"{rate['single']:,.0f} |",
            "",
            f"Speed-up: {result['speedup']:.2f}x. The SAEs of both ways are "
            f"{'equal bit for bit' if result['bit_equal'] else 'NOT equal'}.",
        ]
    )
