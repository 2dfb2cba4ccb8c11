"""The names sae_fast's options take, without torch: the command line builds its parser (and
answers --help) from these before anything imports torch."""

from __future__ import annotations

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


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether value is an int (a bool is not) and, given a minimum, >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return minimum is None or value >= minimum
