"""Tiny models saved as local folders (what `--model FOLDER` loads) and a small text corpus.

Shared by the CLI, evaluation, feature and demo tests; everything is offline and deterministic.
"""

from __future__ import annotations

import importlib
from itertools import cycle, islice
from pathlib import Path

import torch
from models import tiny_bert, tiny_causal_lm

from sae_fast import SparseAutoencoder

_MODULES = ("json", "argparse", "pathlib", "functools", "itertools", "collections", "textwrap")
_MODULES += ("string", "heapq", "bisect", "shlex", "dataclasses")


def write_corpus(path: Path, paragraphs: int = 40) -> str:
    """A .txt of `paragraphs` paragraphs from standard-library module docstrings; its path."""
    found = []
    for name in _MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        found += [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
    path.write_text("\n\n".join(islice(cycle(found), paragraphs)) + "\n")
    return str(path)


def save_model(folder: Path, build=tiny_causal_lm) -> str:
    """Save build()'s model and tokenizer into folder, as `load_model` reads them; its path."""
    model, tokenizer = build()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_bert(folder: Path) -> str:
    """save_model with the tiny BERT encoder (no language-model head)."""
    return save_model(folder, tiny_bert)


def identity_sae(d_in: int, dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """A ReLU SAE that reconstructs any input exactly: latents relu(x_i) and relu(-x_i).

    W_enc = W_dec = [I; -I] and zero biases, so x_hat = relu(x) - relu(-x) = x.
    """
    sae = SparseAutoencoder(d_in, 2 * d_in, activation="relu", dtype=dtype)
    eye = torch.eye(d_in, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae.eval()
