"""Generators seeded from tuples of ints: any block of a seeded stream rebuilt on its own."""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on device seeded from keys (an epoch's order, a block of latents, ...)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))
