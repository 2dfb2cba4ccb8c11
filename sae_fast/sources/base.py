"""What every activation source offers, and the shuffle buffer that decorrelates model rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..options import is_int
from ..validation import check_int


class SourceError(ValueError):
    """A source is configured wrongly or cannot produce data (empty text, bad cache, ...)."""


@runtime_checkable
class ActivationSource(Protocol):
    """An endless, seeded stream of activation rows of width d_in.

    next_batch(n) -> (n, d_in); the stream wraps around epochs and is deterministic given the
    source's seed. state_dict() is torch.save-able, and load_state_dict(state) on a fresh source
    built the same way continues the stream bit for bit. describe() is JSON-able and goes into
    training configs and logs.

    Data parallelism (sources of a distributed run): next_batch(n, part=(i, p)) -> the rows
    part_rows(n, i, p) of a batch of n that data-parallel rank i of p trains on. A source's
    attribute broadcast_rows, False when absent: every process draws the same global stream
    and keeps its slice (synthetic data, a cache: cheap, and the same batches in every
    layout); True: each data rank has its own stream (a model on its share of the
    documents), drawn by one process of its latent group and broadcast to the others.
    """

    d_in: int

    def next_batch(self, n: int) -> Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def describe(self) -> dict: ...


def broadcasts(source: ActivationSource) -> bool:
    """Whether source's rows are drawn by one rank and broadcast (ActivationSource); a
    source that does not say shares one stream."""
    return getattr(source, "broadcast_rows", False)


def check_batch_size(n: int) -> None:
    check_int(n, "n", minimum=0, error=SourceError)


def part_rows(n: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of n that part `part` of `parts` equal parts holds."""
    check_int(parts, "parts", error=SourceError)
    if not is_int(part, 0) or part >= parts:
        raise SourceError(f"part must be in [0, {parts}), got {part!r}")
    return n * part // parts, n * (part + 1) // parts


def check_state(state: dict, identity: dict) -> None:
    """Raise SourceError unless state was saved by a source with this identity.

    Resuming from another source's state would silently change the data, so the settings that
    shape the stream are stored with it and compared on load.
    """
    if not isinstance(state, dict) or "identity" not in state:
        raise SourceError("state is not a source state_dict (no identity field)")
    saved = state["identity"]
    if saved != identity:
        keys = sorted(set(saved) | set(identity), key=str)
        differ = [
            f"{k}: {saved.get(k)!r} != {identity.get(k)!r}"
            for k in keys
            if saved.get(k) != identity.get(k)
        ]
        raise SourceError(
            "state was saved by a different source (saved != this one): " + "; ".join(differ)[:1000]
        )


class ShuffleBuffer:
    """A pool of rows from which batches are drawn at random, refilled from a producer.

    take(n) first calls refill() until the pool holds at least max(capacity, n) rows, then
    removes n rows chosen uniformly by its own generator. refill() returns (r, d) rows; the
    pool overshoots by less than one refill. The pool's rows and the generator state are the
    whole state (the producer keeps its own).
    """

    def __init__(
        self,
        capacity: int,
        refill: Callable[[], Tensor],
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        check_int(capacity, "capacity", error=SourceError)
        self.capacity, self.refill, self.device = capacity, refill, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._rows: Tensor | None = None  # storage; only the first _count rows are live
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, rows: Tensor) -> None:
        """Append rows: (r, d)."""
        if rows.ndim != 2:
            raise SourceError(f"rows must be (r, d), got shape {tuple(rows.shape)}")
        rows = rows.to(self.device)
        if self._rows is None:
            self._rows = rows.new_empty(max(self.capacity, rows.shape[0]), rows.shape[1])
        if rows.shape[1:] != self._rows.shape[1:] or rows.dtype != self._rows.dtype:
            raise SourceError(
                f"rows are {tuple(rows.shape)} {rows.dtype} but the buffer holds "
                f"(*, {self._rows.shape[1]}) {self._rows.dtype}"
            )
        end = self._count + rows.shape[0]
        if end > self._rows.shape[0]:
            grown = self._rows.new_empty(max(end, 2 * self._rows.shape[0]), self._rows.shape[1])
            grown[: self._count] = self._rows[: self._count]
            self._rows = grown
        self._rows[self._count : end] = rows
        self._count = end

    def take(self, n: int) -> Tensor:
        """Remove and return n random rows: (n, d)."""
        check_batch_size(n)
        while self._count < max(self.capacity, n):
            self.add(self.refill())
        pick = torch.randperm(self._count, generator=self.generator)[:n]
        taken = torch.zeros(self._count, dtype=torch.bool)
        taken[pick] = True
        # Fill the holes below the new end with the survivors above it: O(n d), not O(capacity d).
        new_count = self._count - n
        holes = pick[pick < new_count]
        movers = (~taken[new_count:]).nonzero().squeeze(1) + new_count
        out = self._rows[pick.to(self.device)]
        self._rows[holes.to(self.device)] = self._rows[movers.to(self.device)]
        self._count = new_count
        return out

    def state_dict(self, columns: slice = slice(None)) -> dict:
        """The pool's rows (only `columns` of them) and the generator's state."""
        rows = None if self._rows is None else self._rows[: self._count, columns].cpu().clone()
        return {"rows": rows, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._rows, self._count = None, 0
        if state["rows"] is not None:
            self.add(state["rows"])
