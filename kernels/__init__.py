"""Triton kernels, installed as ``sae_fast.kernels`` (never as a top-level ``kernels``).

One file per op (kernel, launcher, autograd.Function): encode_topk.py (fused encoder -> ReLU ->
TopK that never writes the (n, m) pre-activations; its Function is the shared scaffold's,
built by the backend registry) and decode.py (sparse decoder gather and its grad values).
They back the ``triton`` backend of :mod:`sae_fast.backends` and import only its shared
scaffold (sae_fast.backends.pairs), never another backend. Nothing here touches a GPU at
import time. Under ``TRITON_INTERPRET=1`` (set before triton is imported)
they run on CPU tensors, for tests.
"""

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
