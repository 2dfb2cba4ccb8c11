"""Triton kernels, installed as ``sae_fast.kernels`` (never as a top-level ``kernels``).

One file per op (kernel, launcher, autograd.Function): encode_topk.py (fused encoder -> ReLU ->
TopK that never writes the (n, m) pre-activations; its Function is the shared scaffold's,
built by the backend registry) and decode.py (sparse decoder gather and its grad values).
They back the ``triton`` backend of :mod:`sae_fast.backends` and import only its shared
scaffold (sae_fast.backends.pairs), never another backend. Nothing here touches a GPU at
import time. Under ``TRITON_INTERPRET=1`` (set before triton is imported)
they run on CPU tensors, for tests.

The top-level name ``kernels`` belongs to Hugging Face's package, which transformers imports.
Python run from the root of a checkout (``python``, ``python -m pytest``, ``python -m
sae_fast``) puts that root first on ``sys.path``, where ``import kernels`` would find this
folder. Imported under that name, this file hands the name over to the package that owns it,
or fails as if the folder were not there; none of the kernels below is ever imported as
``kernels.*``.
"""

import os
import sys


def _hand_over(name: str) -> None:
    """Replace this module in ``sys.modules`` by ``name`` as found anywhere but this checkout."""
    import importlib.util
    from importlib.machinery import PathFinder

    here = os.path.realpath(__file__)
    checkout = os.path.dirname(os.path.dirname(here))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != checkout]
    for finder in sys.meta_path:
        if finder is PathFinder:
            spec = PathFinder.find_spec(name, elsewhere)
        else:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, None) if find_spec is not None else None
        if spec is not None and (spec.origin is None or os.path.realpath(spec.origin) != here):
            break
    else:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the kernels/ folder of the sae_fast checkout at "
            f"{checkout} is sae_fast.kernels, never a top-level module)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds once this file has run.
    sys.modules[name] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over(__name__)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
