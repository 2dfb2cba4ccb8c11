"""`sae-fast convert`: convert an SAE or a cross-layer transcoder between formats."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..options import SPARSE_ACTIVATIONS
from ..training.config import ConfigError
from .common import SubParser, check_counts, check_text

if TYPE_CHECKING:
    from ..clt import CrossLayerTranscoder


def add_parser(sub: SubParser) -> None:
    """Its subparser, from build_parser's sub()."""
    convert = sub(
        "convert",
        help="convert an SAE or a cross-layer transcoder between formats",
        description="Load an SAE or a cross-layer transcoder (CLT) in any format sae_fast reads "
        "(detected) and write it in another: sae_fast, saelens, sparsify, ... for SAEs; "
        "sae_fast, circuit-tracer, llamascopium for CLTs. A TopK CLT goes to circuit-tracer or "
        "llamascopium as JumpReLU, its thresholds calibrated (--calibrate) on the activations "
        "of the model and hook points it was trained on.",
    )
    convert.add_argument("src", help="checkpoint to read (folder or file)")
    convert.add_argument("dst", help="where to write")
    convert.add_argument("--to", required=True, help="format to write")
    convert.add_argument("--from", dest="source_format", help="format of src (default: detect)")
    calibrate = convert.add_argument_group("a TopK CLT to JumpReLU")
    calibrate.add_argument(
        "--calibrate",
        metavar="TEXT",
        help="text whose activations calibrate the thresholds: 'stdlib' or a file (held-out "
        "documents); half of the tokens calibrate, the other half measure the FVU of both",
    )
    calibrate.add_argument(
        "--calibrate-tokens", type=int, default=8192, help="tokens read (default: 8192)"
    )
    calibrate.add_argument("--model", help="the model the CLT reads (default: its provenance)")
    convert.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .. import formats

    clt_only = set(formats.readable("clt")) - set(formats.readable("sae"))
    if formats.kind_of(args.src) == "clt" or args.source_format in clt_only:
        return _convert_clt(args)
    for name in ("calibrate", "model"):
        if getattr(args, name) is not None:
            raise ConfigError(
                f"--{name}: only for a TopK cross-layer transcoder; {args.src} is an SAE"
            )
    from ..sae import SparseAutoencoder

    sae = SparseAutoencoder.load(args.src, format=args.source_format)
    sae.save(args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to}) from {args.src}")
    return 0


def _convert_clt(args: argparse.Namespace) -> int:
    from .. import formats
    from ..clt import CrossLayerTranscoder

    clt = CrossLayerTranscoder.load(args.src, format=args.source_format)
    held = formats.holds_activation(args.to, clt.activation, kind="clt")
    if clt.activation in SPARSE_ACTIVATIONS and not held:  # saved as JumpReLU, calibrated
        clt = _calibrated(clt, args)
    elif args.calibrate is not None:
        raise ConfigError(f"--calibrate: this CLT is {clt.activation}, which {args.to} holds")
    clt.save(args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to}) from {args.src}")
    return 0


def _calibrated(clt: CrossLayerTranscoder, args: argparse.Namespace) -> CrossLayerTranscoder:
    """The JumpReLU CLT of a TopK one (sae_fast.clt.to_jumprelu), on the first half of
    --calibrate-tokens tokens of --calibrate; prints both CLTs' FVU per target layer on the
    other half."""
    from ..analysis.clt_eval import clt_activations, clt_metrics
    from ..clt import to_jumprelu
    from ..sources import documents

    if args.calibrate is None:
        raise ConfigError(
            f"--calibrate: {args.to} holds no {clt.activation} CLT; give held-out text whose "
            "activations calibrate JumpReLU thresholds ('stdlib' or a file)"
        )
    check_text(args.calibrate, "--calibrate")
    check_counts(args, "calibrate_tokens")
    if args.calibrate_tokens < 2:
        raise ConfigError("--calibrate-tokens: at least 2 (half calibrate, half evaluate)")
    x, y = clt_activations(clt, documents(args.calibrate), args.calibrate_tokens, args.model)
    if x.shape[1] < 2:
        raise ConfigError(f"--calibrate: {args.calibrate} gives {x.shape[1]} token; 2 are needed")
    half = x.shape[1] // 2
    jump = to_jumprelu(clt, x[:, :half].split(1024, dim=1))
    if y is not None:
        for name, each in (("topk", clt), ("jumprelu", jump)):
            fvu = clt_metrics(each.eval(), x[:, half:], y[:, half:])["fvu"]
            print(f"{name} FVU per target layer: {', '.join(f'{v:.4f}' for v in fvu)}")
    return jump
