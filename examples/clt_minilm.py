"""A cross-layer transcoder over all six MLPs of all-MiniLM-L6-v2, trained offline on the
CPU, with its held-out FVU per target layer, TopK and calibrated JumpReLU.

    python examples/clt_minilm.py [--steps 600 --n-latents 2048 --k 16 --out runs/clt_minilm]

The model and the text are packaged: the docstrings of Python's standard library, every
tenth document held out. One model pass per batch of 64-token windows reads every layer's
MLP input and output (sae_fast.sources.stacked_activations). The CLT trains on them, each
layer scaled to mean norm sqrt(d), with sae_fast's CLT loss (sum of per-layer squared
errors, AuxK on dead features) and Adam. The scales are then folded in, the CLT is
calibrated to JumpReLU on held-out tokens, and both are evaluated on the rest of the
held-out tokens and saved. This is a hand loop over the library's pieces, the steps
`sae-fast train --clt` takes written out (docs/clt.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from sae_fast import CrossLayerTranscoder
from sae_fast.analysis.clt_eval import clt_metrics
from sae_fast.clt import to_jumprelu
from sae_fast.files import atomic_path
from sae_fast.sources import load_model, stacked_activations
from sae_fast.sources.text import stdlib_docstrings
from sae_fast.training.clt_losses import CLTLossWeights, clt_training_loss

LAYERS = 6
HOOKS_IN = [f"mlp_in.{i}" for i in range(LAYERS)]
HOOKS_OUT = [f"mlp_out.{i}" for i in range(LAYERS)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536, help="training tokens (default: 65536)")
    ap.add_argument("--held-out", type=int, default=8192, help="held-out tokens (default: 8192)")
    ap.add_argument("--steps", type=int, default=600, help="Adam steps (default: 600)")
    ap.add_argument("--batch-size", type=int, default=256, help="tokens per step")
    ap.add_argument("--n-latents", type=int, default=2048, help="features per layer")
    ap.add_argument("--k", type=int, default=16, help="active features per token and layer")
    ap.add_argument("--out", type=Path, default=Path("runs/clt_minilm"), help="output folder")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm")
    hooks = [HOOKS_IN, HOOKS_OUT]
    train = (d for i, d in enumerate(stdlib_docstrings()) if i % 10)
    held = itertools.islice(stdlib_docstrings(), 0, None, 10)
    x, y = stacked_activations(model, tokenizer, train, hooks, max_tokens=args.tokens)
    x_held, y_held = stacked_activations(model, tokenizer, held, hooks, max_tokens=args.held_out)
    half = x_held.shape[1] // 2  # calibration tokens, then evaluation tokens

    d = x.shape[-1]
    a = d**0.5 / x.norm(dim=-1).mean(dim=1)  # (6,): each layer's input scale
    c = d**0.5 / y.norm(dim=-1).mean(dim=1)  # and output scale
    x, y = x * a[:, None, None], y * c[:, None, None]
    m = args.n_latents
    clt = CrossLayerTranscoder(n_layers=LAYERS, d_in=d, n_latents=m, k=args.k)
    optimizer = torch.optim.Adam(clt.parameters(), lr=5e-4)
    weights = CLTLossWeights(k_aux=d // 2)
    since_fired = torch.zeros(LAYERS, m)  # tokens since each feature last fired
    for step in range(args.steps):
        rows = torch.randint(0, x.shape[1], (args.batch_size,))
        dead = since_fired > 20 * m  # about 160 firings expected in that many tokens
        res = clt_training_loss(clt, x[:, rows], y[:, rows], weights, dead)
        optimizer.zero_grad()
        res.loss.backward()
        optimizer.step()
        fired = res.out.code.to_dense(m).gt(0).any(dim=1)
        since_fired = torch.where(fired, 0, since_fired + args.batch_size)
        if step % 100 == 0 or step == args.steps - 1:
            terms = {k: round(v.item(), 1) for k, v in res.terms.items()}
            print(f"step {step}: {terms}, dead {int(dead.sum())}", flush=True)
    clt.fold_scales_(a, c)
    clt.provenance = {"model": "minilm", "hooks_in": HOOKS_IN, "hooks_out": HOOKS_OUT}
    clt.eval()
    jump = to_jumprelu(clt, x_held[:, :half].split(512, dim=1))
    result = {"tokens": {"train": x.shape[1], "held_out": x_held.shape[1] - half}}
    for name, each in (("topk", clt), ("jumprelu", jump.eval())):
        metrics = clt_metrics(each, x_held[:, half:], y_held[:, half:])
        result[name] = {key: [round(v, 4) for v in values] for key, values in metrics.items()
                        if key != "tokens"}  # fmt: skip
        print(f"{name}: held-out FVU per target layer {result[name]['fvu']}")
    clt.save(args.out / "clt")
    jump.save(args.out / "clt_circuit_tracer", format="circuit-tracer")
    with atomic_path(args.out / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
