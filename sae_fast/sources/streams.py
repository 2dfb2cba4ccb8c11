"""One stream per hook point of a multi-hook ModelSource: several SAEs from one model pass.

A ModelSource on hook points (h_1, ..., h_H) yields rows that hold their activations side
by side, shuffled together. hook_streams(source) gives one ActivationSource per hook point:
the first stream to ask for a batch draws it from the model source, and every stream gets
its own columns of it, so each SAE trains on the rows a single-hook source of its hook
point would give (the same windows, the same shuffle) while the model runs once.

The streams draw in lockstep: each asks for the same batch sizes in the same order (the
trainers of one run do), and a stream that asks for another size than was drawn for it
raises SourceError. A stream's state_dict holds the source's position and its own columns
of the shuffle buffer; once every stream of a fresh set has loaded its part (the states of
one step), the source continues from there with all its columns.
"""

from __future__ import annotations

from collections import deque
from itertools import accumulate, pairwise

import torch
from torch import Tensor

from .base import SourceError, check_state
from .model import ModelSource


class _Fanout:
    """The model source and what its streams have drawn but not taken yet."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        edges = [0, *accumulate(source.widths)]
        self.columns = [slice(lo, hi) for lo, hi in pairwise(edges)]
        self.pending: list[deque[Tensor]] = [deque() for _ in self.columns]
        self.loaded: dict[int, dict] = {}

    def take(self, index: int, n: int) -> Tensor:
        if self.loaded:
            raise SourceError(
                f"only the hook points {sorted(self.loaded)} of {len(self.columns)} loaded a "
                "state: resume every stream of the run from the same step"
            )
        if not self.pending[index]:
            rows = self.source.next_batch(n)
            for queue, cols in zip(self.pending, self.columns, strict=True):
                queue.append(rows[:, cols].contiguous())
        rows = self.pending[index].popleft()
        if rows.shape[0] != n:
            raise SourceError(
                f"the stream of hook point {self.source.hooks[index]!r} asked for {n} rows "
                f"where {rows.shape[0]} were drawn for it: the streams must draw in lockstep"
            )
        return rows

    def load(self, index: int, state: dict) -> None:
        self.loaded[index] = state
        if len(self.loaded) < len(self.columns):
            return
        parts = [self.loaded[i] for i in range(len(self.columns))]
        first = parts[0]
        for part in parts[1:]:
            same = (part["epoch"], part["position"]) == (first["epoch"], first["position"])
            generator = part["buffer"]["generator"]
            if not same or not torch.equal(generator, first["buffer"]["generator"]):
                raise SourceError(
                    "the hook points' stream states are from different points of the data: "
                    "resume every stream of the run from the same step"
                )
        rows = [part["buffer"]["rows"] for part in parts]
        whole = None if rows[0] is None else torch.cat(rows, dim=1)
        buffer = {"rows": whole, "generator": first["buffer"]["generator"]}
        self.source.load_position({**first, "buffer": buffer})
        self.loaded = {}
        for queue in self.pending:
            queue.clear()


class HookStream:
    """The rows of one hook point of a multi-hook ModelSource (an ActivationSource)."""

    def __init__(self, fanout: _Fanout, index: int) -> None:
        self._fanout, self.index = fanout, index
        source = fanout.source
        self.hook = source.hooks[index]
        self.d_in, self.dtype = source.widths[index], source.dtype
        self.model, self.tokenizer = source.model, source.tokenizer

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)) -> Tensor:
        """This hook point's columns of the next n shuffled rows: (n, d_in)."""
        if tuple(part) != (0, 1):
            raise SourceError("the streams of several hook points serve one process only")
        return self._fanout.take(self.index, n)

    def describe(self) -> dict:
        described = self._fanout.source.describe()
        modules = described.pop("modules", None) or [described["module"]]
        described.pop("widths", None)
        described.pop("hooks", None)  # the run's, in its own config.json
        return {**described, "hook": self.hook, "module": modules[self.index], "d_in": self.d_in}

    def identity(self) -> dict:
        return {**self._fanout.source.identity(), "stream": self.index}

    def state_dict(self) -> dict:
        """The source's position and this hook point's columns of its buffer."""
        if self._fanout.pending[self.index]:
            raise SourceError(f"the stream of {self.hook!r} holds rows it has not taken yet")
        columns = self._fanout.columns[self.index]
        return {"identity": self.identity(), **self._fanout.source.position_state(columns)}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.identity())
        self._fanout.load(self.index, state)


def hook_streams(source: ModelSource) -> list[HookStream]:
    """One stream per hook point of source, in its order (module docstring)."""
    fanout = _Fanout(source)
    return [HookStream(fanout, i) for i in range(len(source.hooks))]
