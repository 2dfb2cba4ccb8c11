"""Toy activations built from a known sparse dictionary, to check that an SAE recovers it."""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_fits, check_int
from .base import SourceError, check_batch_size, check_state, part_rows

# Held-out synthetic rows: the training dictionary (fixed by the seed), with the rows drawn by
# SyntheticSource(..., seed=seed, stream_seed=seed + HELD_OUT_STREAM) instead.
HELD_OUT_STREAM = 1000


class SyntheticSource:
    """Rows x = sum of k_active distinct ground-truth features with random coefficients + noise.

    true_features: (n_features, d_in) unit rows, fixed by seed. Each row draws k_active
    distinct features with coefficients uniform in value_range and adds noise * N(0, I)
    (the toy setup of the SAE primer: d_in=10, n_features=24, k_active=3, noise=0.02).
    stream_seed: None draws the rows from the generator that drew the features; a number
    draws them from a generator of their own, so held-out rows over the same dictionary are
    SyntheticSource(..., seed=s, stream_seed=another).
    """

    broadcast_rows = False  # cheap to draw: every process draws the global batch

    def __init__(
        self,
        d_in: int,
        n_features: int,
        k_active: int,
        noise: float = 0.02,
        seed: int = 0,
        value_range: tuple[float, float] = (0.5, 1.5),
        stream_seed: int | None = None,
    ) -> None:
        for name, value in (("d_in", d_in), ("n_features", n_features), ("k_active", k_active)):
            check_int(value, name, error=SourceError)
        if k_active > n_features:
            raise SourceError(f"k_active ({k_active}) must be <= n_features ({n_features})")
        if noise < 0:
            raise SourceError(f"noise must be >= 0, got {noise}")
        low, high = value_range
        if not 0 <= low <= high:
            raise SourceError(
                f"value_range must be (low, high) with 0 <= low <= high, got {value_range}"
            )
        self.d_in, self.n_features, self.k_active = d_in, n_features, k_active
        self.noise, self.seed, self.value_range = noise, seed, (float(low), float(high))
        check_fits(
            4 * n_features * d_in,
            f"a synthetic dictionary of n_features={n_features} x d_in={d_in}",
            torch.device("cpu"),
            SourceError,
        )
        self.generator = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d_in, generator=self.generator)
        self.true_features = features / features.norm(dim=1, keepdim=True)
        self.stream_seed = stream_seed
        if stream_seed is not None:
            self.generator = torch.Generator().manual_seed(stream_seed)
        self.rows_emitted = 0

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """The next n rows with their codes: x (n, d_in), codes (n, n_features)."""
        check_batch_size(n)
        g, (low, high) = self.generator, self.value_range
        # The k largest of n_features uniform keys are k distinct features, uniformly chosen.
        active = torch.rand(n, self.n_features, generator=g).topk(self.k_active, dim=1).indices
        values = low + (high - low) * torch.rand(n, self.k_active, generator=g)
        codes = torch.zeros(n, self.n_features).scatter_(1, active, values)
        x = codes @ self.true_features + self.noise * torch.randn(n, self.d_in, generator=g)
        self.rows_emitted += n
        return x, codes

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)) -> Tensor:
        """The next n rows: (n, d_in); part=(i, p): the rows part_rows(n, i, p) of them."""
        lo, hi = part_rows(n, *part)
        return self.sample(n)[0][lo:hi]

    def state_dict(self) -> dict:
        return {
            "identity": self.describe(),
            "generator": self.generator.get_state(),
            "rows_emitted": self.rows_emitted,
        }

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.describe())
        self.generator.set_state(state["generator"])
        self.rows_emitted = state["rows_emitted"]

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "d_in": self.d_in,
            "n_features": self.n_features,
            "k_active": self.k_active,
            "noise": self.noise,
            "seed": self.seed,
            "stream_seed": self.stream_seed,
            "value_range": list(self.value_range),
        }


def feature_recovery(true_features: Tensor, W_dec: Tensor) -> float:
    """Mean over true directions of the best cosine similarity with any decoder row.

    true_features: (f, d), W_dec: (m, d). 1.0 means every true feature has a decoder row
    pointing along it. Signs count: latents are non-negative, so a row pointing the other way
    cannot reconstruct the feature.
    """
    if true_features.ndim != 2 or W_dec.ndim != 2 or true_features.shape[1] != W_dec.shape[1]:
        raise SourceError(
            f"true_features (f, d) and W_dec (m, d) must share d, got "
            f"{tuple(true_features.shape)} and {tuple(W_dec.shape)}"
        )
    true = torch.nn.functional.normalize(true_features.detach().double(), dim=1)
    learned = torch.nn.functional.normalize(W_dec.detach().double().to(true.device), dim=1)
    return (true @ learned.T).max(dim=1).values.mean().item()


class SyntheticCLTSource:
    """Every layer's MLP input and output from known cross-layer features: what a
    cross-layer transcoder should recover.

    Layer i's input is a SyntheticSource's rows (n_features unit features, k_active per row,
    noise; seed + i). Feature f of layer i writes to its own layer's output and to each later
    one with probability 1/2, along a random unit vector: true_decoders[i] (n_features,
    n_layers - i, d), zero where it does not write. Layer t's output is the sum over i <= t of
    layer i's codes times their decoders to t. A row holds x[0..L-1] then y[0..L-1] side by
    side: (n, 2 * n_layers * d), as a model source over those hook points gives them.
    """

    broadcast_rows = False

    def __init__(
        self,
        n_layers: int,
        d: int,
        n_features: int,
        k_active: int,
        noise: float = 0.02,
        seed: int = 0,
        stream_seed: int | None = None,
    ) -> None:
        check_int(n_layers, "n_layers", error=SourceError)
        self.n_layers, self.seed, self.stream_seed = n_layers, seed, stream_seed
        self.layers = [
            SyntheticSource(
                d,
                n_features,
                k_active,
                noise,
                seed=seed + i,
                stream_seed=None if stream_seed is None else stream_seed + i,
            )
            for i in range(n_layers)
        ]
        g = torch.Generator().manual_seed(seed + n_layers)
        self.true_decoders = []
        for i in range(n_layers):
            W = torch.randn(n_features, n_layers - i, d, generator=g)
            writes = torch.rand(n_features, n_layers - i, generator=g) < 0.5
            writes[:, 0] = True
            self.true_decoders.append(W / W.norm(dim=-1, keepdim=True) * writes[..., None])
        self.d, self.widths = d, (d,) * (2 * n_layers)
        self.d_in = 2 * n_layers * d

    @property
    def true_encoders(self) -> list[Tensor]:
        """Each layer's (n_features, d) input features."""
        return [layer.true_features for layer in self.layers]

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)) -> Tensor:
        """The next n rows: (n, 2 * n_layers * d); part: the rows part_rows(n, *part)."""
        lo, hi = part_rows(n, *part)
        xs, ys = [], [torch.zeros(n, self.d) for _ in range(self.n_layers)]
        for i, layer in enumerate(self.layers):
            x, codes = layer.sample(n)
            xs.append(x)
            for t, y in enumerate(torch.einsum("nf,ftd->tnd", codes, self.true_decoders[i]), i):
                ys[t] += y
        return torch.cat(xs + ys, dim=1)[lo:hi]

    def state_dict(self) -> dict:
        return {"identity": self.describe(), "layers": [s.state_dict() for s in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.describe())
        for layer, saved in zip(self.layers, state["layers"], strict=True):
            layer.load_state_dict(saved)

    def describe(self) -> dict:
        first = self.layers[0].describe()
        return {**first, "kind": "synthetic-clt", "n_layers": self.n_layers, "d": self.d,
                "d_in": self.d_in, "seed": self.seed, "stream_seed": self.stream_seed}  # fmt: skip
