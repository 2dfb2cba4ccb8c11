"""Triton kernels, installed as ``sae_fast.kernels`` (never as a top-level ``kernels``).

The fused encode-ReLU-TopK and sparse decode kernels land here and register the ``triton``
backend in :mod:`sae_fast.backends`.
"""
