"""Checks every activation source must pass: determinism and bit-exact resume."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import torch

from sae_fast.sources import ActivationSource


def roundtrip(state: dict) -> dict:
    """state through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_exact_resume(
    make: Callable[[], ActivationSource], n: int, before: int, after: int
) -> ActivationSource:
    """Take `before` batches, save, take `after` more; a fresh source resumed from the saved
    state gives the same `after` batches bit for bit. Returns the resumed source."""
    source = make()
    assert isinstance(source, ActivationSource)
    json.dumps(source.describe())
    first = [source.next_batch(n) for _ in range(before)]
    assert all(b.shape == (n, source.d_in) for b in first)
    state = roundtrip(source.state_dict())
    expected = [source.next_batch(n) for _ in range(after)]
    assert not torch.equal(expected[0], expected[-1]), "the stream does not advance"

    again = make()
    assert all(torch.equal(batch, again.next_batch(n)) for batch in first), "not deterministic"
    resumed = make()
    resumed.load_state_dict(state)
    got = [resumed.next_batch(n) for _ in range(after)]
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(want, have), f"batch {step} after resume differs"
    return resumed
