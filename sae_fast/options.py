"""The names sae_fast's options take, without torch: the command line builds its parser (and
answers --help) from these before anything imports torch."""

from __future__ import annotations

import re

# SAE activations; those with a k are computed by the sparse TopK ops (and trained with AuxK).
ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu", "gated")
SPARSE_ACTIVATIONS = ("topk", "batchtopk")
INPUT_NORMS = ("none", "layer_norm", "constant_norm")
# The dtypes activations come in (models, caches, the CUDA kernels); parameters may also be
# float64. Names as configs and command lines spell them.
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")
PARAMETER_DTYPES = (*ACTIVATION_DTYPES, "float64")
# The sparse-op backends, highest priority first (backends.registered() lists the same).
BACKENDS = ("cuda", "triton", "torch")
_HOOK_RANGE = re.compile(r"^(.+)\.(\d+)-(\d+)$")


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether value is an int (a bool is not) and, given a minimum, >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return minimum is None or value >= minimum


def parse_hooks(spec: str) -> list[str]:
    """The hook points of --hooks: names separated by commas, where kind.A-B stands for
    kind.A, ..., kind.B (resid_post.0-5: six hook points); ValueError unless they are
    distinct and at least one."""
    hooks: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        found = _HOOK_RANGE.match(item)
        if found:
            kind, first, last = found[1], int(found[2]), int(found[3])
            if first > last:
                raise ValueError(f"the range {item!r} runs backwards")
            hooks += [f"{kind}.{layer}" for layer in range(first, last + 1)]
        elif item:
            hooks.append(item)
        else:
            raise ValueError(f"an empty name in {spec!r}")
    repeated = sorted({h for h in hooks if hooks.count(h) > 1})
    if repeated:
        raise ValueError(f"{repeated} named more than once in {spec!r}")
    return hooks
