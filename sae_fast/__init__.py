"""sae_fast: custom-kernel accelerated sparse autoencoders for PyTorch.

The names below import on first use (sae_fast.lazy), so the command line starts without
torch; `sae_fast.SparseAutoencoder` and `from sae_fast import encode_topk` work as usual.
"""

from .lazy import exports
from .version import VERSION

__version__ = VERSION

_EXPORTS = {
    "ACTIVATIONS": ".options",
    "BackendUnavailableError": ".backends",
    "CheckpointError": ".checkpoint",
    "CrossLayerTranscoder": ".clt.module",
    "SAEOutput": ".sae",
    "SparseAutoencoder": ".sae",
    "SparseCode": ".ops",
    "backend_status": ".backends:status",
    "decode": ".ops",
    "encode_topk": ".ops",
    "encode_topk_auxk": ".ops",
    "reference": ".reference",
}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__ = exports(__name__, _EXPORTS)
