"""The real peers (sparsify, SAELens) compute our function from the same weights.

CI installs them with the `bench` extra; without them these tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import impls, suites


@pytest.mark.parametrize("name", ["sparsify", "saelens"])
def test_peer_matches_sae_fast_and_trains(name):
    peer = impls.make(name)
    reason = peer.why_not("cpu")
    if reason is not None:
        pytest.skip(reason)
    n, d, m, k = 96, 48, 700, 8
    w = impls.Weights.random(d, m, torch.float32, "cpu")
    x = impls.activations(n, d, torch.float32, "cpu")
    peer.build(w, k)
    want = suites.sae_fast_output(w, x, k)
    assert suites.mismatch(peer, x, want) is None
    # The same weights in our module give the same reconstruction, row for row.
    ours = impls.make("sae_fast[torch]")
    ours.build(w, k)
    with torch.no_grad():
        torch.testing.assert_close(peer.forward(x), ours.forward(x), rtol=1e-4, atol=1e-4)
    before = [p.detach().clone() for p in peer.sae.parameters()]
    peer.train_step(x)
    assert any(not torch.equal(a, b) for a, b in zip(before, peer.sae.parameters(), strict=True))
