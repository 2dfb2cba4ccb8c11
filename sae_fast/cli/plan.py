"""`sae-fast plan`: predict a training run's memory per device and step time, for each layout."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..options import ACTIVATION_DTYPES, ADAM_MOMENTS, AUTOCAST_DTYPES, integer
from ..training.config import ConfigError, TrainConfig
from .common import SubParser, check_counts
from .summary import add_json_argument


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    plan = sub(
        "plan",
        help="predict a training run's memory per device and step time, for each layout",
        description="From a roofline model (no GPU needed): for each way of splitting GPUS "
        "devices into data- and latent-parallel ranks, the memory per device (parameters, "
        "gradients, Adam's moments, a step's activations and buffers, a checkpoint's save), "
        "whether it fits, the largest dictionary that would, and the predicted step time. "
        "With --clt-layers L, of a cross-layer transcoder over L layers (--n-latents and --k "
        "per layer).",
    )
    from ..training import roofline  # torch-free: the device models

    defaults = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
    plan.add_argument("--d-in", type=integer, required=True, help="activation width")
    plan.add_argument("--n-latents", type=integer, required=True, help="dictionary size m")
    plan.add_argument("--k", type=integer, default=defaults.k, help="active latents per token")
    plan.add_argument("--clt-layers", type=integer, default=1,
                      help="a cross-layer transcoder's layers (1: an SAE)")  # fmt: skip
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
    add_json_argument(plan)
    plan.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..training import roofline
    from ..validation import check_int

    check_counts(args, "d_in", "n_latents", "k", "batch_size", "gpus", "clt_layers")
    check_int(args.init_tokens, "--init-tokens", minimum=0, error=ConfigError)
    if args.k > args.n_latents:
        raise ConfigError(f"--k={args.k} is larger than --n-latents={args.n_latents}")
    shape = roofline.Shape(
        n=args.batch_size, d=args.d_in, m=args.n_latents, k=args.k, dtype=args.dtype,
        compute_dtype=AUTOCAST_DTYPES[args.autocast], moments=args.adam_moments,
        init_tokens=args.init_tokens, layers=args.clt_layers,
    )  # fmt: skip
    cpu_bytes = None
    if args.gpu == "cpu":
        import torch

        from ..validation import device_memory

        cpu_bytes = device_memory(torch.device("cpu"))
    result = roofline.plan(shape, args.gpus, args.gpu, cpu_bytes)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gib = 2**30
    clt = f"a CLT over {shape.layers} layers, per layer: " if shape.layers > 1 else ""
    print(
        f"{clt}d_in={shape.d} n_latents={shape.m} k={shape.k} batch={shape.n} {shape.dtype} "
        f"(compute {shape.compute_dtype or shape.dtype}, Adam moments {shape.moments}) on "
        f"{args.gpus} x {args.gpu}: {result['capacity'] / gib:.1f} GiB usable per device"
    )
    if "gemm_ms" in result:
        low, high = result["predicted_x_gemm"]
        print(
            f"predicted step {low:.2f}-{high:.2f}x the encoder GEMM "
            f"({result['gemm_ms'][0]:.2f}-{result['gemm_ms'][1]:.2f} ms) on one GPU "
            "(a roofline, not a measurement: docs/training.md, Planning a run)"
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
