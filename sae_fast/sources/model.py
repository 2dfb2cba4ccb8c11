"""Model activations on a text corpus: token windows, hooked forwards, a shuffled stream."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..validation import check_int, dtype_name
from .base import ShuffleBuffer, SourceError, check_state, part_rows
from .hooks import hook_module_path, model_device, probe_hooks, run_to_hooks
from .seeds import seeded_generator
from .text import documents

T = TypeVar("T")
_TOKENIZE_DOCS = 64  # documents per tokenizer call: batched calls are much faster
# Characters per tokenizer call, and the longest piece of a document tokenised at once: a
# 10 MB document then costs only the windows taken from it.
_TOKENIZE_CHARS = 1 << 16
_SPACE_AFTER_WORD = re.compile(r"(?<=\S)\s")


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _pieces(documents: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(piece, whether it ends its document): each document in pieces of at most
    _TOKENIZE_CHARS characters, cut just before a run of whitespace, where BPE and WordPiece
    tokenizers start a new token anyway (a run of that many characters without whitespace is
    cut where it must)."""
    for doc in documents:
        while len(doc) > _TOKENIZE_CHARS:
            cuts = _SPACE_AFTER_WORD.finditer(doc, _TOKENIZE_CHARS // 2, _TOKENIZE_CHARS + 1)
            cut = max((c.start() for c in cuts), default=_TOKENIZE_CHARS)
            yield doc[:cut], False
            doc = doc[cut:]
        yield doc, True


def _tokenizer_calls(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """pieces in groups of at most _TOKENIZE_DOCS, and _TOKENIZE_CHARS characters (or one
    piece)."""
    group: list[tuple[str, bool]] = []
    chars = 0
    for piece in pieces:
        if group and (len(group) == _TOKENIZE_DOCS or chars + len(piece[0]) > _TOKENIZE_CHARS):
            yield group
            group, chars = [], 0
        group.append(piece)
        chars += len(piece[0])
    if group:
        yield group


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_int(value, name, error=SourceError)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special token ids the tokenizer wraps a text in, e.g. [CLS], [SEP].

    Found by encoding a probe with and without special tokens, which works for any tokenizer
    (BERT's [CLS] x [SEP], Llama's <s> x, GPT-2's bare x).
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise SourceError(f"cannot tell which special tokens {type(tokenizer).__name__} adds")


def token_windows(
    tokenizer: Any, documents: Iterable[str], context_size: int
) -> Iterator[list[int]]:
    """Token id windows of at most context_size ids, special tokens included.

    Each document is tokenised and cut into consecutive pieces that fill a window together with
    the tokenizer's special tokens ([CLS] piece [SEP] for BERT); the last piece may be shorter.
    No tokens are dropped; documents without tokens give no window. A long document is
    tokenised a piece at a time (_pieces), as far as the windows taken from it reach.
    """
    _check_positive(context_size=context_size)
    prefix, suffix = special_tokens(tokenizer)
    body = context_size - len(prefix) - len(suffix)
    if body < 1:
        raise SourceError(
            f"context_size ({context_size}) must exceed the {len(prefix) + len(suffix)} special "
            f"tokens the tokenizer adds"
        )
    carry: list[int] = []  # a document's ids not yet in a window
    for group in _tokenizer_calls(_pieces(documents)):
        texts = [text for text, _ in group]
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for ids, (_, ends) in zip(encoded, group, strict=True):
            carry += ids
            whole = len(carry) if ends else len(carry) // body * body
            for start in range(0, whole, body):
                yield prefix + carry[start : start + body] + suffix
            carry = carry[whole:]


def pad_windows(batch: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Right-pad token windows: (input_ids, attention_mask), both (len(batch), longest)."""
    ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, window in enumerate(batch):
        ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    return ids, mask


def model_activations(
    model: nn.Module,
    tokenizer: Any,
    hook: str | Sequence[str],
    windows: Iterable[list[int]],
    batch_size: int = 32,
    device: torch.device | str | None = None,
    exclude_special: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Per window, (token_ids: (t,), activations: (t, d)) at hook point hook; for several
    hook points, their activations side by side: (t, d_1 + d_2 + ...), in their order.

    Windows run batch_size at a time, right-padded; padding is never yielded, and with
    exclude_special neither are the tokenizer's own special tokens (their norms are outliers).
    The forward stops after the (last) hook point. token_ids are on the CPU, activations on
    device (default: the model's).
    """
    _check_positive(batch_size=batch_size)
    device = model_device(model) if device is None else torch.device(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix, suffix = special_tokens(tokenizer)
    special = torch.tensor(prefix + suffix if exclude_special else [], dtype=torch.long)
    for batch in _batched(windows, batch_size):
        ids, mask = pad_windows(batch, pad)
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
        found = run_to_hooks(model, [hook] if isinstance(hook, str) else hook, **inputs)
        acts = found[0] if len(found) == 1 else torch.cat(found, dim=-1)
        keep = mask.bool() & ~torch.isin(ids, special)
        for row in range(len(batch)):
            yield ids[row, keep[row]], acts[row, keep[row].to(device)]


def model_name(model: nn.Module) -> str:
    """The name or folder model was loaded from (else its class name)."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def model_description(model: nn.Module, hook: str | Sequence[str]) -> dict:
    """JSON-able model, architecture, hook point and the module path it names (for several
    hook points: "hooks" and "modules", in their order)."""
    found = {"model": model_name(model), "architecture": type(model).__name__}
    if isinstance(hook, str):
        return {**found, "hook": hook, "module": hook_module_path(model, hook)}
    return {**found, "hooks": list(hook), "modules": [hook_module_path(model, h) for h in hook]}


class ModelSource:
    """Shuffled activations of model at hook point hook on the documents named by documents_spec.

    hook may name several hook points: one forward per batch of windows serves them all, a
    row holds their activations side by side (widths: theirs, d_in: their sum) and one
    shuffle moves them together (sources.hook_streams splits them, one stream per hook).

    Windows of context_size tokens run batch_size per forward into a ShuffleBuffer of
    shuffle_buffer rows on device (default: the model's), from which next_batch draws; the
    documents cycle (epoch += 1) when they run out. The state is the epoch, the windows consumed
    in it and the buffer: restoring it re-tokenises up to that window (cheap) without running
    the model on the skipped ones.

    part=(i, p): data-parallel rank i of p reads every p-th document from the i-th on, with
    a shuffle order of its own; next_batch(n, part) gives it its n // p rows of a batch of n.

    model_b: a second model run on the same windows (a crosscoder's, for model diffing; it
    must tokenize as model's tokenizer does): a row holds model's hook points, then model_b's.
    """

    broadcast_rows = True  # a model's forward: run once per data rank, sent to its latent group

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hook: str | Sequence[str],
        documents_spec: str | Path,
        context_size: int = 128,
        batch_size: int = 32,
        shuffle_buffer: int = 8192,
        seed: int = 0,
        device: torch.device | str | None = None,
        exclude_special: bool = True,
        part: tuple[int, int] = (0, 1),
        model_b: tuple[nn.Module, Any] | None = None,
    ) -> None:
        part_rows(0, *part)  # checks part
        self.hooks = (hook,) if isinstance(hook, str) else tuple(hook)
        if not self.hooks or len(set(self.hooks)) < len(self.hooks):
            raise SourceError(f"hook points must be distinct and at least one, got {hook!r}")
        self.models = [model] if model_b is None else [model, model_b[0]]
        if model_b is not None and model_b[1].get_vocab() != tokenizer.get_vocab():
            raise SourceError(
                "model_b tokenizes differently from model: a crosscoder reads both models on "
                "the same tokens"
            )
        for m in self.models:  # a bad hook point fails first, before any text is read
            for name in self.hooks:
                hook_module_path(m, name)
        _check_positive(context_size=context_size, batch_size=batch_size)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and context_size > max_positions:
            raise SourceError(
                f"context_size ({context_size}) exceeds the model's {max_positions} positions"
            )
        self.model, self.tokenizer = model, tokenizer
        self.hook = hook if isinstance(hook, str) else self.hooks
        self.documents_spec, self.context_size = documents_spec, context_size
        self.batch_size, self.seed, self.exclude_special = batch_size, seed, exclude_special
        self.part = tuple(part)
        self.device = model_device(model) if device is None else torch.device(device)
        if next(self._epoch_windows(), None) is None:
            raise SourceError(f"text source {str(documents_spec)!r} holds no text")
        probes = [p for m in self.models for p in probe_hooks(m, self.hooks)]
        if len({p.dtype for p in probes}) > 1:
            raise SourceError(f"hook points {list(self.hooks)} produce different dtypes")
        self.widths = tuple(p.shape[-1] for p in probes)
        self.d_in, self.dtype = sum(self.widths), probes[0].dtype
        # Part 0 shuffles as a single process does; the others draw orders of their own.
        order_seed = seed if part[0] == 0 else seeded_generator(seed, part[0]).initial_seed()
        self.buffer = ShuffleBuffer(shuffle_buffer, self._refill, order_seed, self.device)
        self.epoch, self.position = 0, 0
        self._windows: Iterator[list[int]] | None = None

    def _epoch_windows(self) -> Iterator[list[int]]:
        mine = islice(documents(self.documents_spec), self.part[0], None, self.part[1])
        return token_windows(self.tokenizer, mine, self.context_size)

    def _refill(self) -> Tensor:
        """Activations of the next batch_size windows (fewer at the end of an epoch): (r, d)."""
        while True:
            if self._windows is None:
                self._windows = islice(self._epoch_windows(), self.position, None)
            batch = list(islice(self._windows, self.batch_size))
            if batch:
                break
            self.epoch, self.position, self._windows = self.epoch + 1, 0, None
        self.position += len(batch)
        found = []
        for model in self.models:  # the same windows and kept tokens through each model
            rows = model_activations(
                model,
                self.tokenizer,
                self.hook,
                batch,
                len(batch),
                self.device,
                self.exclude_special,
            )
            found.append(torch.cat([acts for _, acts in rows]))
        return torch.cat(found, dim=1)

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)) -> Tensor:
        """The next n shuffled activation rows: (n, d_in), on device, in the hook's dtype;
        with part (this source's), this part's share of a batch of n."""
        if tuple(part) != self.part:
            raise SourceError(f"part {tuple(part)} of a source built for part {self.part}")
        lo, hi = part_rows(n, *part)
        return self.buffer.take(hi - lo)

    def identity(self) -> dict:
        """What pins the stream, stored with its state and compared on load."""
        # The model's path may move between runs; its class and width still pin the stream.
        return {k: v for k, v in self.describe().items() if k not in ("model", "model_b")}

    def position_state(self, columns: slice = slice(None)) -> dict:
        """The stream's place (epoch, window, shuffle generator) and the buffered rows'
        columns `columns`: a state_dict without the identity."""
        buffer = self.buffer.state_dict(columns)
        return {"epoch": self.epoch, "position": self.position, "buffer": buffer}

    def load_position(self, state: dict) -> None:
        """Continue from a position_state holding every column."""
        self.epoch, self.position = state["epoch"], state["position"]
        self.buffer.load_state_dict(state["buffer"])
        self._windows = None

    def state_dict(self) -> dict:
        return {"identity": self.identity(), **self.position_state()}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.identity())
        self.load_position(state)

    def describe(self) -> dict:
        return {
            "kind": "model",
            **model_description(self.model, self.hook),
            **({"model_b": model_name(self.models[1])} if len(self.models) > 1 else {}),
            "d_in": self.d_in,
            **({"widths": list(self.widths)} if len(self.widths) > 1 else {}),
            "dtype": dtype_name(self.dtype),
            "text": str(self.documents_spec),
            "context_size": self.context_size,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.buffer.capacity,
            "seed": self.seed,
            "exclude_special": self.exclude_special,
            **({"part": list(self.part)} if self.part != (0, 1) else {}),
        }
