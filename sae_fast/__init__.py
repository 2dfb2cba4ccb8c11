"""sae_fast: custom-kernel accelerated sparse autoencoders for PyTorch."""

from . import reference
from .backends import BackendUnavailableError
from .backends import status as backend_status
from .checkpoint import CheckpointError
from .ops import SparseCode, decode, encode_topk, encode_topk_auxk
from .sae import SAEOutput, SparseAutoencoder
from .sae_config import ACTIVATIONS

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BackendUnavailableError",
    "CheckpointError",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCode",
    "backend_status",
    "decode",
    "encode_topk",
    "encode_topk_auxk",
    "reference",
]
