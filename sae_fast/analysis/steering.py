"""Model integration: run a model through an SAE at a hook point, read its latents, steer.

Hook points are the trainer's: resid_post.L, mlp_out.L, attn_out.L or a module path (see
sources.hooks). Inside ``attach``/``steer`` the hooked module's output h (..., d_out) becomes

    add_error=False:  x_hat(edited code)                          the SAE's reconstruction
    add_error=True:   x_hat(edited code) + (h - x_hat(code))  =  h + delta

with delta = sum over the edited latents j of (new_j - old_j) * W_dec[j] (times the per-token
scale of an input_norm SAE). Only the edited latents enter delta: a TopK code never becomes a
(tokens, n_latents) tensor, and clamping a latent outside a token's top-k still adds it. With
add_error=True and no edits the output is h itself, so the model's outputs are unchanged.

    with attach(model, "resid_post.1", sae, add_error=True) as site:
        logits = model(ids).logits
        site.code, site.latents()  # the last forward's code; dense (batch, seq, n_latents)
    with steer(model, "resid_post.1", sae, clamp={12: 5.0}, zero=[3]):
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import Tensor, nn

from ..ops import SparseCode
from ..sae import SparseAutoencoder, eval_mode
from ..sources.hooks import Captured, HookPointError, capture, splice

Positions = slice | Tensor | None


class FeatureEdits:
    """Edits of chosen latents, applied to the SAE code before decoding.

    clamp {latent: value} sets a latent to value, scale {latent: factor} multiplies it, zero
    [latents] sets it to 0; each latent in at most one of them. positions picks the tokens of
    each forward that are edited: None all; a slice over the sequence dim (dim -2 of the hooked
    output; slice(-1, None) is each forward's newest token, in generation with a KV cache too,
    where every step sees only its new tokens); or a bool mask that broadcasts to the hooked
    output's leading dims (batch, seq).
    """

    def __init__(
        self,
        clamp: Mapping[int, float] | None = None,
        scale: Mapping[int, float] | None = None,
        zero: Iterable[int] = (),
        positions: Positions = None,
    ) -> None:
        # Per edited latent: new = old * mult + add (clamp: 0, v; scale: f, 0; zero: 0, 0).
        entries: list[tuple[str, int, float, float]] = []
        for j, v in _mapping("clamp", clamp):
            entries.append(("clamp", j, 0.0, v))
        for j, f in _mapping("scale", scale):
            entries.append(("scale", j, f, 0.0))
        entries.extend(("zero", _latent("zero", j), 0.0, 0.0) for j in zero)
        seen: dict[int, str] = {}
        for arg, j, _, _ in entries:
            if j in seen:
                raise ValueError(f"latent {j} is edited twice (in {seen[j]} and {arg})")
            seen[j] = arg
        if positions is not None and not isinstance(positions, slice | Tensor):
            raise TypeError(
                f"positions must be None, a slice or a bool tensor, got {type(positions).__name__}"
            )
        if isinstance(positions, Tensor) and positions.dtype != torch.bool:
            raise TypeError(f"positions must be a bool mask, got dtype {positions.dtype}")
        self._entries = tuple(entries)
        self.positions = positions

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        parts = [f"{arg}[{j}]: x*{mult:g}+{add:g}" for arg, j, mult, add in self._entries]
        return f"FeatureEdits({', '.join(parts)}, positions={self.positions!r})"

    def check(self, n_latents: int) -> None:
        """Raise ValueError, naming the argument, for a latent outside 0..n_latents-1."""
        for arg, j, _, _ in self._entries:
            if not 0 <= j < n_latents:
                raise ValueError(
                    f"{arg}: latent {j} is out of range for an SAE with {n_latents} latents "
                    f"(0..{n_latents - 1})"
                )

    def delta(self, sae: SparseAutoencoder, code: SparseCode | Tensor) -> Tensor:
        """The change of the SAE's normalised-space reconstruction, (..., d_out).

        code: SparseCode (..., width) or dense (..., n_latents), as sae.encode returns.
        """
        W = sae.W_dec
        index = torch.tensor([e[1] for e in self._entries], device=W.device)
        mult, add = (
            torch.tensor([e[i] for e in self._entries], device=W.device, dtype=W.dtype)
            for i in (2, 3)
        )
        if isinstance(code, SparseCode):
            # old_j = the value at j in the row's top-k, else 0: (..., width, e) -> (..., e).
            hit = code.indices.unsqueeze(-1) == index
            old = (code.values.unsqueeze(-1) * hit).sum(dim=-2)
        else:
            old = code[..., index]
        change = old.to(W.dtype) * (mult - 1) + add  # new - old, (..., e)
        mask = self._mask(change.shape[:-1], W.device)
        if mask is not None:
            change = change * mask.unsqueeze(-1)
        return change @ W[index]

    def _mask(self, lead: torch.Size, device: torch.device) -> Tensor | None:
        """positions as a bool mask broadcasting to lead (the code's leading dims)."""
        if self.positions is None:
            return None
        if len(lead) == 0:
            raise ValueError("positions needs a hooked output with a sequence dim, got (d,)")
        if isinstance(self.positions, slice):
            mask = torch.zeros(lead[-1], dtype=torch.bool, device=device)
            mask[self.positions] = True
            return mask
        mask = self.positions.to(device)
        try:
            fits = torch.broadcast_shapes(mask.shape, lead) == lead
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"positions mask of shape {tuple(mask.shape)} does not broadcast to the hooked "
                f"output's leading dims {tuple(lead)}; in generation each step sees only its new "
                f"tokens, so use a slice there"
            )
        return mask


def _latent(arg: str, j: object) -> int:
    if isinstance(j, bool):
        raise TypeError(f"{arg}: latent indices must be ints, got {j!r}")
    try:
        return operator.index(j)
    except TypeError:
        raise TypeError(f"{arg}: latent indices must be ints, got {j!r}") from None


def _mapping(arg: str, edits: Mapping[int, float] | None) -> Iterator[tuple[int, float]]:
    if edits is None:
        return
    if not isinstance(edits, Mapping):
        raise TypeError(f"{arg} must map latent -> value, got {type(edits).__name__}")
    for j, v in edits.items():
        value = float(v)
        if not math.isfinite(value):
            raise ValueError(f"{arg}: the value for latent {j!r} must be finite, got {v!r}")
        yield _latent(arg, j), value


class SAESite:
    """An SAE spliced in at a hook point: what attach and steer yield.

    code: the SAE code of the hooked output in the last forward, before edits: a SparseCode
    (..., width) for topk/batchtopk, dense latents (..., n_latents) otherwise; None before the
    first forward. In generation with a KV cache each step overwrites it with that step's new
    tokens. edits may be replaced inside the with-block; it is checked against the SAE.
    """

    def __init__(
        self,
        hook: str,
        sae: SparseAutoencoder,
        add_error: bool,
        edits: FeatureEdits | None,
        read: Captured | None = None,
    ) -> None:
        self.hook, self.sae, self.add_error = hook, sae, add_error
        self.edits = edits
        self.read = read  # a transcoder's input: hook_in's output in the same forward
        self.code: SparseCode | Tensor | None = None

    @property
    def edits(self) -> FeatureEdits:
        return self._edits

    @edits.setter
    def edits(self, edits: FeatureEdits | None) -> None:
        edits = FeatureEdits() if edits is None else edits
        if not isinstance(edits, FeatureEdits):
            raise TypeError(f"edits must be FeatureEdits or None, got {type(edits).__name__}")
        edits.check(self.sae.n_latents)
        self._edits = edits

    def latents(self) -> Tensor:
        """The last forward's unedited latents, dense: (..., n_latents)."""
        if self.code is None:
            raise RuntimeError(f"no forward has run through hook point {self.hook!r} yet")
        if isinstance(self.code, SparseCode):
            return self.code.to_dense(self.sae.n_latents)
        return self.code

    def __call__(self, h: Tensor) -> Tensor:
        """The splice: hooked output h (..., d_out) -> the SAE's output in h's dtype/device
        (of h itself, or for a transcoder of what it read)."""
        sae = self.sae
        if self.read is not None and self.read.output is None:
            raise HookPointError(
                f"the transcoder's input hook point did not run before {self.hook!r}"
            )
        given = h if self.read is None else self.read.output
        here = f"hook point {self.hook!r}"
        read = here if self.read is None else "the transcoder's input hook point"
        for what, tensor, width, where in (
            ("d_in", given, sae.d_in, read),
            ("d_out", h, sae.d_out, here),
        ):
            if tensor.shape[-1] != width:
                raise ValueError(
                    f"the SAE's {what}={width} does not match the width {tensor.shape[-1]} of "
                    f"{where} (output shape {tuple(tensor.shape)})"
                )
        if given.shape[:-1] != h.shape[:-1]:
            raise ValueError(
                f"the transcoder read {tuple(given.shape)} but {self.hook!r} gives "
                f"{tuple(h.shape)}: the positions differ"
            )
        param = sae.W_dec
        x = given.to(param.device, param.dtype)
        if self.add_error:
            # h + delta: the reconstruction error is added back exactly, and no decode is run.
            self.code, x_hat = sae.encode(x), None
        else:
            out = sae(x)
            self.code, x_hat = out.code, out.x_hat
        delta = None
        if self.edits:
            delta = self.edits.delta(sae, self.code)
            if sae.input_norm != "none":
                # The edit acts in the SAE's normalised space; forward maps x_hat back by scale.
                delta = delta * sae.normalize_input(x)[1][0]
        if x_hat is None:
            # Add in the wider of the two dtypes; h is returned as is when nothing is edited.
            return h if delta is None else (h + delta.to(h.device)).to(h.dtype)
        if delta is not None:
            x_hat = x_hat + delta
        return x_hat.to(h.device, h.dtype)


def check_site(sae: SparseAutoencoder, hook_in: object | None) -> None:
    """An SAE that can be spliced in: a SparseAutoencoder, with hook_in exactly if it is a
    transcoder (which reads hook_in and replaces hook)."""
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae must be a SparseAutoencoder, got {type(sae).__name__}")
    if sae.transcoder != (hook_in is not None):
        raise ValueError(
            "a transcoder reads hook_in and replaces hook: give both"
            if sae.transcoder
            else "hook_in is a transcoder's, and this SAE is not one"
        )


@contextmanager
def attach(
    model: nn.Module,
    hook: str,
    sae: SparseAutoencoder,
    *,
    add_error: bool = False,
    edits: FeatureEdits | None = None,
    hook_in: str | None = None,
) -> Iterator[SAESite]:
    """Run model's hook point through sae inside the with-block; yields the SAESite.

    hook: resid_post.L, mlp_out.L, attn_out.L or a module path; an unknown one raises
    HookPointError listing the valid names. The hooked output (..., d_out) is cast to the SAE's
    dtype and device and its result back. add_error=True adds back the reconstruction error,
    so only the edited latents change the output. The SAE runs in eval mode (batchtopk then
    uses its calibrated threshold); its mode and the hook are restored on exit, also on error.
    A transcoder reads hook_in's output and its prediction replaces hook's output (with
    add_error, hook's output plus the edits' change).
    """
    check_site(sae, hook_in)
    with ExitStack() as stack:
        read = stack.enter_context(capture(model, hook_in)) if hook_in is not None else None
        site = SAESite(hook, sae, add_error, edits, read)
        stack.enter_context(eval_mode(sae))
        stack.enter_context(splice(model, hook, site))
        yield site


def steer(
    model: nn.Module,
    hook: str,
    sae: SparseAutoencoder,
    *,
    clamp: Mapping[int, float] | None = None,
    scale: Mapping[int, float] | None = None,
    zero: Iterable[int] = (),
    positions: Positions = None,
    add_error: bool = True,
    hook_in: str | None = None,
) -> AbstractContextManager[SAESite]:
    """attach with feature edits (see FeatureEdits), adding the reconstruction error back by
    default so that only the chosen features change the model's activations (a transcoder:
    read at hook_in, edits at hook).
    """
    edits = FeatureEdits(clamp=clamp, scale=scale, zero=zero, positions=positions)
    return attach(model, hook, sae, add_error=add_error, edits=edits, hook_in=hook_in)
