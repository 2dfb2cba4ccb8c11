"""The names sae_fast's options take, without torch: the command line builds its parser (and
answers --help) from these before anything imports torch."""

from __future__ import annotations

import re
from itertools import pairwise

# SAE activations; those with a k are computed by the sparse TopK ops (and trained with AuxK).
ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu", "gated")
SPARSE_ACTIVATIONS = ("topk", "batchtopk")
# The activations a cross-layer transcoder takes (gated has no cross-layer form in the field's
# tools).
CLT_ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")
INPUT_NORMS = ("none", "layer_norm", "constant_norm")
# The dtypes activations come in (models, caches, the CUDA kernels); parameters may also be
# float64. Names as configs and command lines spell them.
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")
PARAMETER_DTYPES = (*ACTIVATION_DTYPES, "float64")
# The sparse-op backends, highest priority first (backends.registered() lists the same).
BACKENDS = ("cuda", "triton", "chunked", "torch")
# How Adam stores its two moments: in the parameters' dtype, or in bfloat16 (computed in fp32).
ADAM_MOMENTS = ("param", "bf16")
# The name of the packaged all-MiniLM-L6-v2 wherever a model is accepted, and the Hugging Face
# id other tools (SAELens, Neuronpedia, transformers) know it by.
MINILM, MINILM_HUB_ID = "minilm", "sentence-transformers/all-MiniLM-L6-v2"
# The share of a text's documents `sae-fast split` (and the demo) holds out by default.
HELD_OUT = 0.1
# Mixed precision of a training step: its option value -> the compute dtype (None: off).
AUTOCAST_DTYPES = {"none": None, "bf16": "bfloat16", "fp16": "float16"}
_HOOK_RANGE = re.compile(r"^(.+)\.([0-9]+)-([0-9]+)$")
# Numbers as options and files write them: ASCII digits only (int() and str.isdigit() also
# take other scripts' digits, '٣', and superscripts, '²').
_NATURAL = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"[+-]?[0-9]+")
# inf and nan too: the option's own check then says what range it wants.
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|nan)", re.I)


def hub_id(model: str | None) -> str | None:
    """A model's name as other tools resolve it: the Hugging Face id for our alias MINILM,
    else the name as given."""
    return MINILM_HUB_ID if model == MINILM else model


def is_natural(text: str) -> bool:
    """Whether text is a whole number >= 0 in ASCII digits."""
    return _NATURAL.fullmatch(text) is not None


def integer(text: str) -> int:
    """An option's integer, in ASCII digits (a sign allowed); ValueError otherwise."""
    if not _INTEGER.fullmatch(text.strip()):
        raise ValueError(f"expected an integer in digits 0-9, got {text!r}")
    return int(text)


def decimal(text: str) -> float:
    """An option's number, like 0.5, 3, 1e-4 or inf in ASCII digits; ValueError otherwise."""
    if not _DECIMAL.fullmatch(text.strip()):
        raise ValueError(f"expected a number like 0.5 or 1e-4, got {text!r}")
    return float(text)


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether value is an int (a bool is not) and, given a minimum, >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return minimum is None or value >= minimum


def clt_hooks(layers: str) -> tuple[list[str], list[str]]:
    """(mlp_in.A..B, mlp_out.A..B): what a cross-layer transcoder over layers "A-B" (or one
    layer "A") reads and writes; ValueError unless it names layers in order."""
    found = re.match(r"^([0-9]+)(?:-([0-9]+))?$", layers.strip() if isinstance(layers, str) else "")
    if not found:
        raise ValueError(f"expected A-B (first and last layer, e.g. 0-5), got {layers!r}")
    first, last = int(found[1]), int(found[2] or found[1])
    if first > last:
        raise ValueError(f"the range {layers!r} runs backwards")
    span = range(first, last + 1)
    return [f"mlp_in.{i}" for i in span], [f"mlp_out.{i}" for i in span]


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


def check_matryoshka(prefixes: object, n_latents: int, activation: object) -> None:
    """A Matryoshka SAE's prefix sizes: ascending ints in 1..n_latents ending at n_latents,
    on a TopK or BatchTopK SAE; ValueError says what is wrong."""
    if activation not in SPARSE_ACTIVATIONS:
        raise ValueError(f"matryoshka needs activation topk or batchtopk, not {activation!r}")
    if (
        not isinstance(prefixes, list | tuple)
        or not prefixes
        or any(isinstance(p, bool) or not isinstance(p, int) for p in prefixes)
        or any(a >= b for a, b in pairwise(prefixes))
        or prefixes[0] < 1
        or prefixes[-1] != n_latents
    ):
        raise ValueError(
            f"matryoshka must be ascending prefix sizes ending at n_latents={n_latents}, got "
            f"{prefixes!r}"
        )


def parse_matryoshka(spec: str, n_latents: int) -> list[int] | None:
    """'1024,4096' as prefix sizes for n_latents latents (n_latents appended when the last is
    smaller: the whole dictionary is the last prefix; the whole dictionary alone is a plain
    SAE, None); ValueError says what is wrong."""
    try:
        prefixes = [integer(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"expected prefix sizes like 1024,4096, got {spec!r}") from None
    if prefixes and prefixes[-1] < n_latents:
        prefixes.append(n_latents)
    check_matryoshka(prefixes, n_latents, "topk")
    return prefixes if len(prefixes) > 1 else None
