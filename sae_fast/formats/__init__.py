"""Checkpoint formats: sae_fast's own and the layouts other SAE libraries save.

Each format says whether a path holds one of its checkpoints (detect), reads it as an SAE
config and tensors in our layout (sae_fast.sae_config) computing the same function, and,
where its layout can hold such an SAE, writes one from a config and tensors. Formats never
import the module: SparseAutoencoder.load and .save build and take apart the pair.
Cross-layer transcoders have layouts of their own (kind "clt": clt_native, circuit_tracer,
llamascopium), read and written as (sae_fast.clt.config, tensors).
"""

# Each module registers its format; detectors recognise disjoint layouts.
from . import (  # noqa: F401
    circuit_tracer,
    clt_native,
    dictionary_learning,
    llamascopium,
    native,
    openai,
    saelens,
    sparsify,
)
from .registry import (
    Config,
    Format,
    Tensors,
    detect,
    holds_activation,
    kind_of,
    load,
    readable,
    register,
    save,
    writable,
)

__all__ = [
    "Config",
    "Format",
    "Tensors",
    "detect",
    "holds_activation",
    "kind_of",
    "load",
    "readable",
    "register",
    "save",
    "writable",
]
