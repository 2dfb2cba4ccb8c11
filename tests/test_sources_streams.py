"""Several hook points from one forward: run_to_hooks, the multi-hook ModelSource and its
per-hook streams, against single-hook sources bit for bit, and their resume."""

from __future__ import annotations

import pytest
import torch
from models import WIDTH, tiny_bert, tiny_causal_lm
from source_checks import roundtrip
from test_sources_model import corpus

from sae_fast.options import parse_hooks
from sae_fast.sources import (
    ModelSource,
    SourceError,
    capture,
    hook_streams,
    run_to_hook,
    run_to_hooks,
)

# BERT's intermediate dense layer is twice as wide: streams of unequal widths.
HOOKS = ("resid_post.1", "encoder.layer.0.intermediate", "mlp_out.0")
OPTIONS = dict(context_size=16, batch_size=3, shuffle_buffer=50, seed=1)


def sources(tmp_path, hooks=HOOKS, **kw):
    """(the multi-hook source on hooks, its streams, one single-hook source per hook)."""
    model, tokenizer = tiny_bert()
    text = corpus(tmp_path / "c.txt", 30)
    multi = ModelSource(model, tokenizer, hooks, text, **{**OPTIONS, **kw})
    singles = [ModelSource(model, tokenizer, h, text, **{**OPTIONS, **kw}) for h in hooks]
    return multi, hook_streams(multi), singles


def test_run_to_hooks_returns_each_hook_and_stops_after_the_last():
    model, _ = tiny_causal_lm()
    ids = torch.tensor([[5, 6, 7, 8]])
    names = ["resid_post.1", "mlp_out.0", "resid_post.0"]
    with capture(model, "transformer.ln_f") as final:
        found = run_to_hooks(model, names, input_ids=ids)
    assert final.output is None  # the forward stopped at resid_post.1, before the final norm
    for name, out in zip(names, found, strict=True):
        assert torch.equal(out, run_to_hook(model, name, input_ids=ids)), name


def test_multi_hook_rows_sit_side_by_side(tmp_path):
    multi, streams, _ = sources(tmp_path)
    assert multi.widths == (WIDTH, 2 * WIDTH, WIDTH) and multi.d_in == 4 * WIDTH
    assert [s.d_in for s in streams] == list(multi.widths)
    described = multi.describe()
    assert described["hooks"] == list(HOOKS) and len(described["modules"]) == 3
    assert streams[1].describe()["hook"] == HOOKS[1]
    assert streams[1].describe()["module"] == "encoder.layer.0.intermediate"


def test_each_stream_equals_its_single_hook_source_bit_for_bit(tmp_path):
    _, streams, singles = sources(tmp_path)
    for n in (40, 17, 64, 64, 5):  # refills of the buffer fall inside and between batches
        for stream, single in zip(streams, singles, strict=True):
            assert torch.equal(stream.next_batch(n), single.next_batch(n)), (n, stream.hook)


def test_streams_resume_exactly_from_their_states(tmp_path):
    _, streams, _ = sources(tmp_path)
    for n in (30, 45):
        for stream in streams:
            stream.next_batch(n)
    states = [roundtrip(stream.state_dict()) for stream in streams]
    # Each state holds its own columns of the buffer, not the whole row.
    assert [s["buffer"]["rows"].shape[1] for s in states] == [WIDTH, 2 * WIDTH, WIDTH]
    expected = [[stream.next_batch(n) for n in (40, 70)] for stream in streams]
    _, fresh, _ = sources(tmp_path)
    for stream, state in zip(reversed(fresh), reversed(states), strict=True):  # any order
        stream.load_state_dict(state)
    for stream, batches in zip(fresh, expected, strict=True):
        for batch in batches:
            assert torch.equal(stream.next_batch(batch.shape[0]), batch)


def test_streams_refuse_to_draw_out_of_step_or_half_resumed(tmp_path):
    _, streams, _ = sources(tmp_path)
    streams[0].next_batch(10)
    with pytest.raises(SourceError, match="asked for 12 rows where 10 were drawn"):
        streams[1].next_batch(12)
    with pytest.raises(SourceError, match="holds rows it has not taken yet"):
        streams[2].state_dict()
    streams[2].next_batch(10)
    states = [stream.state_dict() for stream in streams[::2]]  # streams 0 and 2 are level
    _, fresh, _ = sources(tmp_path)
    fresh[0].load_state_dict(states[0])
    with pytest.raises(SourceError, match=r"only the hook points \[0\] of 3 loaded a state"):
        fresh[0].next_batch(4)
    with pytest.raises(SourceError, match="saved by a different source"):
        fresh[1].load_state_dict(states[1])  # stream 2's state is not stream 1's


def test_streams_of_different_steps_do_not_combine(tmp_path):
    _, streams, _ = sources(tmp_path)
    early = [stream.state_dict() for stream in streams]
    for stream in streams:
        stream.next_batch(20)
    late = [stream.state_dict() for stream in streams]
    _, fresh, _ = sources(tmp_path)
    fresh[0].load_state_dict(late[0])
    fresh[1].load_state_dict(early[1])
    with pytest.raises(SourceError, match="from different points of the data"):
        fresh[2].load_state_dict(early[2])


def test_a_multi_hook_source_refuses_repeated_hooks(tmp_path):
    with pytest.raises(SourceError, match="must be distinct"):
        sources(tmp_path, hooks=("resid_post.0", "resid_post.0"))


def test_parse_hooks_expands_ranges():
    assert parse_hooks("resid_post.0-2, mlp_out.1") == [
        "resid_post.0",
        "resid_post.1",
        "resid_post.2",
        "mlp_out.1",
    ]
    assert parse_hooks("encoder.layer.3.output") == ["encoder.layer.3.output"]
    for bad, message in [
        ("resid_post.3-1", "runs backwards"),
        ("resid_post.0,,mlp_out.0", "an empty name"),
        ("resid_post.0-1,resid_post.1", r"\['resid_post.1'\] named more than once"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_hooks(bad)
