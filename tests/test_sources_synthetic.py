"""SyntheticSource, feature_recovery and the ShuffleBuffer."""

from __future__ import annotations

import pytest
import torch
from source_checks import assert_exact_resume, roundtrip

from sae_fast.sources import ShuffleBuffer, SourceError, SyntheticSource, feature_recovery


def test_rows_are_sparse_combinations_of_the_true_features():
    source = SyntheticSource(d_in=10, n_features=24, k_active=3, noise=0.0, seed=1)
    F = source.true_features
    assert F.shape == (24, 10)
    torch.testing.assert_close(F.norm(dim=1), torch.ones(24))
    x, codes = source.sample(500)
    assert ((codes != 0).sum(dim=1) == 3).all()
    active = codes[codes != 0]
    assert active.min() >= 0.5 and active.max() <= 1.5
    torch.testing.assert_close(x, codes @ F)
    # Least squares on each row's 3 features recovers its coefficients exactly.
    idx = codes.nonzero()[:, 1].view(500, 3)
    for row in range(5):
        coef = torch.linalg.lstsq(F[idx[row]].T, x[row]).solution
        torch.testing.assert_close(coef, codes[row, idx[row]], atol=1e-5, rtol=1e-5)
    # Every feature gets used, at about the expected rate k/m.
    usage = (codes != 0).float().mean(dim=0)
    assert usage.min() > 0.05 and usage.max() < 0.2


def test_noise_has_the_requested_scale():
    source = SyntheticSource(d_in=64, n_features=128, k_active=4, noise=0.1, seed=0)
    x, codes = source.sample(4000)
    residual = x - codes @ source.true_features
    assert residual.std().item() == pytest.approx(0.1, rel=0.05)


def test_seed_fixes_dictionary_and_stream():
    a, b = SyntheticSource(10, 24, 3, seed=5), SyntheticSource(10, 24, 3, seed=5)
    assert torch.equal(a.true_features, b.true_features)
    assert torch.equal(a.next_batch(7), b.next_batch(7))
    c = SyntheticSource(10, 24, 3, seed=6)
    assert not torch.equal(a.true_features, c.true_features)


def test_stream_seed_gives_other_rows_over_the_same_dictionary():
    a, held = SyntheticSource(10, 24, 3, seed=5), SyntheticSource(10, 24, 3, seed=5, stream_seed=9)
    assert torch.equal(a.true_features, held.true_features)
    assert not torch.equal(a.next_batch(7), held.next_batch(7))
    again = SyntheticSource(10, 24, 3, seed=5, stream_seed=9)
    again.next_batch(7)
    assert torch.equal(held.next_batch(5), again.next_batch(5))
    with pytest.raises(SourceError, match="different source"):
        a.load_state_dict(held.state_dict())


def test_exact_resume():
    resumed = assert_exact_resume(lambda: SyntheticSource(10, 24, 3, seed=2), 16, 3, 4)
    assert resumed.rows_emitted == 7 * 16


def test_resume_from_another_source_is_refused():
    state = SyntheticSource(10, 24, 3, seed=2).state_dict()
    with pytest.raises(SourceError, match="different source"):
        SyntheticSource(10, 24, 3, seed=3).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"d_in": 0, "n_features": 4, "k_active": 1}, "d_in"),
        ({"d_in": 4, "n_features": 2.5, "k_active": 1}, "n_features"),
        ({"d_in": 4, "n_features": 4, "k_active": 5}, "k_active"),
        ({"d_in": 4, "n_features": 4, "k_active": 1, "noise": -1.0}, "noise"),
        ({"d_in": 4, "n_features": 4, "k_active": 1, "value_range": (2.0, 1.0)}, "value_range"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(SourceError, match=name):
        SyntheticSource(**kwargs)


def test_bad_batch_size_is_named():
    with pytest.raises(SourceError, match="n must be"):
        SyntheticSource(4, 4, 1).next_batch(-1)


def test_feature_recovery():
    F = SyntheticSource(16, 32, 3, seed=0).true_features
    shuffled = 3.0 * F[torch.randperm(32)]
    extra = torch.cat([shuffled, torch.randn(10, 16)])
    assert feature_recovery(F, F) == pytest.approx(1.0, abs=1e-12)
    assert feature_recovery(F, extra) == pytest.approx(1.0, abs=1e-12)
    # Decoder rows pointing the wrong way cannot reconstruct non-negative codes.
    assert feature_recovery(F, -F) < 0.6
    F64 = SyntheticSource(64, 64, 3, seed=0).true_features
    random = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    assert feature_recovery(F64, random) < 0.5
    with pytest.raises(SourceError, match="share d"):
        feature_recovery(F, torch.randn(8, 15))


def _counter_buffer(capacity: int, chunk: int, seed: int = 0) -> ShuffleBuffer:
    """A buffer over rows [i, -i], i = 0, 1, ..., produced `chunk` at a time."""
    produced = [0]

    def refill() -> torch.Tensor:
        start = produced[0]
        produced[0] += chunk
        ids = torch.arange(start, start + chunk, dtype=torch.float32)
        return torch.stack([ids, -ids], dim=1)

    buffer = ShuffleBuffer(capacity, refill, seed=seed)
    buffer.produced = produced
    return buffer


def test_shuffle_buffer_hands_out_every_row_once():
    buffer = _counter_buffer(capacity=50, chunk=7)
    out = torch.cat([buffer.take(n) for n in (13, 1, 40, 0, 60, 13)])
    assert out.shape == (127, 2)
    assert torch.equal(out[:, 1], -out[:, 0])
    # The last take drew 13 from a pool refilled to capacity, overshooting by less than a chunk.
    assert 50 <= len(buffer) + 13 < 50 + 7
    remaining = buffer.state_dict()["rows"]  # the pool, read without refilling it
    ids = torch.cat([out[:, 0], remaining[:, 0]]).long()
    assert torch.equal(ids.sort().values, torch.arange(buffer.produced[0]))
    # Shuffled: the first batch is not simply the first rows produced.
    assert not torch.equal(out[:13, 0].long(), torch.arange(13))


def test_shuffle_buffer_resume():
    buffer = _counter_buffer(capacity=32, chunk=5, seed=3)
    buffer.take(20)
    state = roundtrip(buffer.state_dict())
    produced = buffer.produced[0]
    expected = buffer.take(20)
    resumed = _counter_buffer(capacity=32, chunk=5, seed=99)
    resumed.produced[0] = produced  # the producer's position is its owner's state
    resumed.load_state_dict(state)
    assert torch.equal(resumed.take(20), expected)


def test_shuffle_buffer_checks_rows():
    buffer = _counter_buffer(capacity=8, chunk=2)
    with pytest.raises(SourceError, match="capacity"):
        ShuffleBuffer(0, lambda: torch.zeros(1, 1))
    buffer.add(torch.zeros(3, 2))
    with pytest.raises(SourceError, match=r"\(r, d\)"):
        buffer.add(torch.zeros(3))
    with pytest.raises(SourceError, match="buffer holds"):
        buffer.add(torch.zeros(3, 5))
