"""The SparseAutoencoder module: parameters, activations, encode/decode, initialisation, I/O."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import formats, ops, sae_config
from . import reference as ref
from .ops import SparseCode
from .options import SPARSE_ACTIVATIONS
from .sae_config import check_hyperparameters
from .sources.seeds import seeded_generator
from .validation import check_activations, dtype_name

_LN_EPS = 1e-5
_SEED_BLOCK = 4096  # latents per seeded block of seed_parameters_


@dataclass
class SAEOutput:
    """What forward returns.

    x_hat: (..., d_out) reconstruction (a transcoder's prediction). code: a SparseCode
    (..., width) for topk and for batchtopk while training or uncalibrated; a dense
    (..., n_latents) tensor otherwise.
    pre: the dense activations' pre-activation (..., n_latents), for their sparsity losses
    (jumprelu's L0, gated's L1 and aux losses: the gate's pi_gate); None where the sparse
    TopK ops ran (topk; batchtopk while training or uncalibrated).
    """

    x_hat: Tensor
    code: SparseCode | Tensor
    pre: Tensor | None = None


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder over activations of width d_in with n_latents latents.

    Parameters, one row per latent (docs/ARCHITECTURE.md): W_enc (m, d), b_enc (m,), W_dec (m, d),
    b_dec (d,); jumprelu adds log_threshold (m,); gated adds r_mag (m,) and b_mag (m,), with
    b_enc serving as the gate bias. batchtopk keeps a buffer ``threshold`` (scalar) used at
    inference once a trainer has calibrated it (negative means not yet: batch top-k is used).

    transcoder: encode x (..., d_in) without subtracting b_dec and predict another activation
    (..., d_out) (Dunefsky et al. 2024): W_dec (m, d_out), b_dec (d_out,). skip_connection adds
    x @ W_skip.T, W_skip (d_out, d_in), zero at the start, to the output.

    input_norm: per-token normalisation around the SAE, as some checkpoints expect:
    "layer_norm" (x - mean) / (std + 1e-5) (Gao et al. 2024), "constant_norm" x * sqrt(d) /
    ||x||. encode sees the normalised x; forward maps x_hat back (x_hat * std + mean, as
    openai/sparse_autoencoder and SAELens do: eps only guards the division; x_hat / factor);
    decode alone returns the normalised-space reconstruction.

    Initialisation follows Gao et al. 2024: decoder rows are random unit vectors, W_enc is a
    copy of W_dec, biases are zero (see set_b_dec_from_data).
    """

    latent_offset = 0  # the global index of this module's first latent (a shard's is not 0)

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        k: int | None = None,
        activation: str = "topk",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        chunk_size: int | None = None,
        jumprelu_bandwidth: float = 1e-3,
        jumprelu_init_threshold: float = 1e-3,
        input_norm: str = "none",
        matryoshka: list[int] | None = None,
        transcoder: bool = False,
        d_out: int | None = None,
        skip_connection: bool = False,
        provenance: dict | None = None,
    ) -> None:
        super().__init__()
        check_hyperparameters(
            d_in, n_latents, k, activation, input_norm, jumprelu_bandwidth, matryoshka,
            transcoder, d_out, skip_connection,
        )  # fmt: skip
        self.transcoder, self.skip_connection = transcoder, skip_connection
        self.d_out = d_out or d_in
        self.input_norm = input_norm
        # A Matryoshka SAE's nested prefix sizes (the last is n_latents): training makes
        # each prefix of the dictionary reconstruct on its own (training/losses.py).
        self.matryoshka = list(matryoshka) if matryoshka is not None else None
        self.provenance = dict(provenance or {})  # what it was trained on (sae_config)
        if jumprelu_init_threshold <= 0:
            raise ValueError(f"jumprelu_init_threshold must be > 0, got {jumprelu_init_threshold}")
        self.d_in, self.n_latents, self.k, self.activation = d_in, n_latents, k, activation
        self.backend, self.chunk_size = backend, chunk_size
        self.jumprelu_bandwidth = jumprelu_bandwidth
        factory = {"dtype": dtype, "device": device}
        W_dec = torch.randn(n_latents, self.d_out, **factory)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        if self.d_out == d_in:
            W_enc = W_dec.clone()
        else:
            W_enc = torch.randn(n_latents, d_in, **factory)
            W_enc /= W_enc.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **factory))
        if skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, **factory))
        if activation == "jumprelu":
            log_t = torch.full((n_latents,), math.log(jumprelu_init_threshold), **factory)
            self.log_threshold = nn.Parameter(log_t)
        if activation == "gated":
            self.r_mag = nn.Parameter(torch.zeros(n_latents, **factory))
            self.b_mag = nn.Parameter(torch.zeros(n_latents, **factory))
        if activation == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0, **factory))

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        out = f", d_out={self.d_out} (transcoder)" if self.transcoder else ""
        return (
            f"d_in={self.d_in}{out}, n_latents={self.n_latents}{k}, activation={self.activation!r}"
        )

    @property
    def center(self) -> Tensor:
        """(d_in,): what the encoder subtracts from x: b_dec, or zeros for a transcoder (whose
        b_dec is the output's)."""
        return self.W_enc.new_zeros(self.d_in) if self.transcoder else self.b_dec

    # --- encoding -------------------------------------------------------------------------

    def encode(self, x: Tensor) -> SparseCode | Tensor:
        """x: (..., d_in) -> SparseCode (..., width) or dense latents (..., n_latents)."""
        return self._encode(self.normalize_input(x)[0])[0]

    def normalize_input(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x (..., d) in input_norm's space, and (scale, shift) (..., 1) each, with which forward
        maps x_hat back (x_hat * scale + shift); None for input_norm "none"."""
        if self.input_norm == "none":
            return x, None
        check_activations(x, self.d_in, self.W_enc)
        if self.input_norm == "layer_norm":
            shift = x.mean(dim=-1, keepdim=True)
            scale = (x - shift).std(dim=-1, keepdim=True)
            # The checkpoints' own code divides by std + eps but maps back with std alone.
            return (x - shift) / (scale + _LN_EPS), (scale, shift)
        scale = x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)
        return x / scale, (scale, torch.zeros_like(scale))

    def _encode(self, x: Tensor) -> tuple[SparseCode | Tensor, Tensor | None]:
        """x: (..., d_in) -> (code, pre); pre as in SAEOutput."""
        check_activations(x, self.d_in, self.W_enc)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        pre = None
        if self.activation == "topk":
            code = self._topk(flat, self.k)
        elif self.activation == "batchtopk" and (self.training or self.threshold < 0):
            code = self._batchtopk(flat)
        else:
            pre = ref.pre_activation(flat, self.W_enc, self.b_enc, self.center)
            if self.activation == "batchtopk":
                code = ref.threshold_relu(pre, self.threshold)
            elif self.activation == "relu":
                code = ref.relu(pre)
            elif self.activation == "jumprelu":
                code = ref.jumprelu(pre, self.log_threshold.exp(), self.jumprelu_bandwidth)
            else:
                code, pre = ref.gated_encode(
                    flat, self.W_enc, self.b_enc, self.r_mag, self.b_mag, self.center
                )
        if isinstance(code, SparseCode):
            width = code.values.shape[-1]
            code = SparseCode(code.values.reshape(*lead, width), code.indices.reshape(*lead, width))
        else:
            code = code.reshape(*lead, self.n_latents)
        if pre is not None:
            pre = pre.reshape(*lead, self.n_latents)
        return code, pre

    def _topk(self, x: Tensor, k: int) -> SparseCode:
        return ops.encode_topk(
            *autocast_inputs(x, self.W_enc, self.b_enc, self.center),
            k,
            backend=self.backend,
            chunk_size=self.chunk_size,
        )

    def encode_with_auxk(
        self, x: Tensor, dead_mask: Tensor, k_aux: int
    ) -> tuple[SparseCode, SparseCode]:
        """topk/batchtopk training: (code, aux_code) from one encoder pass.  x: (n, d_in).

        aux_code (n, k_aux) is the AuxK code of Gao et al. 2024: the top k_aux of relu(pre)
        among latents with dead_mask (m,) True. For batchtopk, code is the batch top n*k.
        """
        if self.activation not in SPARSE_ACTIVATIONS:
            raise ValueError(
                f"AuxK needs activation in {SPARSE_ACTIVATIONS}, not {self.activation!r}"
            )
        check_activations(x, self.d_in, self.W_enc)
        width = self.k if self.activation == "topk" else self._candidates()
        code, aux = self._topk_auxk(x, width, dead_mask, k_aux)
        if self.activation == "batchtopk":
            code = self._batchtopk(x, code)
        return code, aux

    def _topk_auxk(
        self, x: Tensor, k: int, dead_mask: Tensor, k_aux: int
    ) -> tuple[SparseCode, SparseCode]:
        return ops.encode_topk_auxk(
            *autocast_inputs(x, self.W_enc, self.b_enc, self.center),
            k,
            dead_mask,
            k_aux,
            backend=self.backend,
            chunk_size=self.chunk_size,
        )

    def own_pairs(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(values, rows of W_dec) of a code's pairs (n, k) whose latents this module holds,
        the others' values zero: all of them here (a latent shard holds some)."""
        return values, indices

    def sum_shards(self, t: Tensor) -> Tensor:
        """t summed over the latent shards that hold parts of it: t itself here."""
        return t

    def count_latents(self, mask: Tensor) -> int:
        """How many latents mask (one bool per latent this module holds) marks."""
        return int(mask.sum())

    def _candidates(self) -> int:
        return ops.batch_topk_width(self.k, self.n_latents)

    def _batchtopk(self, x: Tensor, candidates: SparseCode | None = None) -> SparseCode:
        """Top n*k of relu(pre) over the batch x (n, d) (ops.batch_topk)."""
        n = x.shape[0]
        return ops.batch_topk(
            lambda width: self._topk(x, width), n, self.n_latents, n * self.k,
            self._candidates(), candidates,
        )  # fmt: skip

    # --- decoding -------------------------------------------------------------------------

    def decode(self, code: SparseCode | Tensor) -> Tensor:
        """SparseCode (..., width) or dense latents (..., n_latents) -> x_hat (..., d_out),
        without the skip connection (skip)."""
        if isinstance(code, SparseCode):
            values, indices = code
            lead = values.shape[:-1]
            width = values.shape[-1]
            x_hat = self._decode_sparse(values.reshape(-1, width), indices.reshape(-1, width))
        else:
            check_activations(code, self.n_latents, self.W_dec, name="code")
            lead = code.shape[:-1]
            x_hat = ref.decode_dense(code.reshape(-1, self.n_latents), self.W_dec, self.b_dec)
        return x_hat.reshape(*lead, self.d_out)

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip connection's part of the output, x @ W_skip.T: (..., d_out); None
        without one."""
        if not self.skip_connection:
            return None
        x, W_skip = autocast_inputs(x, self.W_skip)
        return x @ W_skip.T

    def output(self, x: Tensor, code: SparseCode | Tensor) -> Tensor:
        """x_hat of input x (..., d_in) from its code: decode(code) plus the skip connection."""
        x_hat = self.decode(code)
        skipped = self.skip(x)
        return x_hat if skipped is None else x_hat + skipped

    def split_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(x, target) of rows (n, d_in) for an SAE (both rows), or (n, d_in + d_out) for a
        transcoder (its input and output activations side by side)."""
        width = self.d_in + self.d_out if self.transcoder else self.d_in
        if rows.shape[-1] != width:
            what = "d_in + d_out" if self.transcoder else "d_in"
            raise ValueError(f"rows must be (..., {what} = {width}), got {tuple(rows.shape)}")
        if not self.transcoder:
            return rows, rows
        return rows[..., : self.d_in], rows[..., self.d_in :]

    def _decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        values, W_dec, b_dec = autocast_inputs(values, self.W_dec, self.b_dec)
        return ops.decode(values, indices, W_dec, b_dec, backend=self.backend)

    def forward(self, x: Tensor) -> SAEOutput:
        """x: (..., d_in) -> SAEOutput with x_hat (..., d_out) and the code."""
        x, stats = self.normalize_input(x)
        code, pre = self._encode(x)
        x_hat = self.output(x, code)
        if stats is not None:
            x_hat = x_hat * stats[0] + stats[1]
        return SAEOutput(x_hat=x_hat, code=code, pre=pre)

    # --- initialisation and constraints ----------------------------------------------------

    @torch.no_grad()
    def seed_parameters_(self, seed: int) -> None:
        """Initialise W_dec (and W_enc, its copy) with random unit rows as the constructor
        does, but from seed alone, the same for each latent whichever process holds it.

        The rows come in blocks of _SEED_BLOCK latents, each from a generator of its own
        (sources.seeds.seeded_generator(seed, block)), so the latents [offset, offset + m) of a
        shard (latent_offset) get the rows that one SAE of all the latents gives them.
        """
        self.W_dec.copy_(self._seeded_rows(seed, self.W_dec.shape[1]))
        if self.W_enc.shape == self.W_dec.shape:
            self.W_enc.copy_(self.W_dec)
        else:  # a transcoder's encoder reads another width: rows of their own
            self.W_enc.copy_(self._seeded_rows(seed, self.d_in, stream=1))

    def _seeded_rows(self, seed: int, width: int, stream: int = 0) -> Tensor:
        """Random unit rows (this module's latents, width) of seed_parameters_."""
        W = seeded_normal(seed, self.latent_offset, self.W_dec.shape[0], width, stream,
                          self.W_dec.device).to(self.W_dec.dtype)  # fmt: skip
        return W / W.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (rows of zero norm are left at zero)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec /= torch.where(norms > 0, norms, torch.ones_like(norms))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop from W_dec.grad each row's component along its decoder row (Gao et al. 2024).

        With unit-norm rows renormalised after each step, that component would only change
        the norm, which the renormalisation undoes.
        """
        grad, W = self.W_dec.grad, self.W_dec
        if grad is None:
            return
        # Row dot products by batched matmul: no (m, d) temporaries in this memory-bound step.
        dot = torch.bmm(grad.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)
        norm_sq = torch.bmm(W.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)
        coef = torch.where(norm_sq > 0, dot / norm_sq, torch.zeros_like(dot))
        grad.addcmul_(W, coef, value=-1)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float, output_scale: float | None = None) -> None:
        """Make an SAE trained on scale * x compute x_hat / scale from raw x (a transcoder
        trained to predict output_scale * y from scale * x: y's prediction from raw x).

        pre is linear in (x, b_dec, b_enc): dividing the biases (and thresholds) by scale
        divides pre and every latent by scale and keeps which latents fire; the decoder rows
        stay as trained (unit norm), so x_hat = z W_dec + b_dec comes out divided by scale.
        With another output scale, W_enc and W_skip take scale / output_scale, and the
        biases and thresholds are divided by output_scale.
        """
        output_scale = scale if output_scale is None else output_scale
        if output_scale != scale and not self.transcoder:
            raise ValueError("output_scale: an SAE's output is in its input's units")
        for value in (scale, output_scale):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"scale must be a finite positive number, got {value}")
        if output_scale != scale:
            self.W_enc *= scale / output_scale
            if self.skip_connection:
                self.W_skip *= scale / output_scale
        scale = output_scale
        self.b_dec /= scale
        self.b_enc /= scale
        if self.activation == "jumprelu":
            self.log_threshold -= math.log(scale)
        elif self.activation == "gated":
            self.b_mag /= scale
        elif self.activation == "batchtopk" and self.threshold >= 0:
            self.threshold /= scale

    @torch.no_grad()
    def fold_column_scales_(self, scales: Tensor) -> None:
        """Make an SAE trained on x * scales (one positive factor per input column, (d_in,):
        a crosscoder's per-source scales) compute x_hat / scales from raw x.

        pre = (x - b_dec) W_enc.T + b_enc: W_enc's columns take their factor and b_dec is
        divided by it, so pre, and every latent, stay as trained; the decoder's columns
        are divided by it, so x_hat comes out in raw units (its rows leave unit norm).
        """
        if self.transcoder:
            raise ValueError("fold_column_scales_ folds an SAE's input scales, not a transcoder's")
        scales = torch.as_tensor(scales, dtype=torch.float64)
        if scales.shape != (self.d_in,) or not bool((scales > 0).all() & scales.isfinite().all()):
            raise ValueError(f"scales must hold d_in={self.d_in} finite positive numbers")
        scales = scales.to(self.W_enc.device)
        self.W_enc.mul_(scales.to(self.W_enc.dtype))
        self.W_dec.div_(scales.to(self.W_dec.dtype))
        self.b_dec.div_(scales.to(self.b_dec.dtype))

    @torch.no_grad()
    def set_b_dec_from_data(
        self, x: Tensor, method: str = "geometric_median", max_iter: int = 100
    ) -> None:
        """Set b_dec from a sample x (..., d_out) of what the SAE outputs: its mean or
        geometric median (Weiszfeld)."""
        check_activations(x, self.d_out, self.b_dec)
        self.b_dec.copy_(data_center(x.reshape(-1, self.d_out), method, max_iter))

    # --- checkpoints ----------------------------------------------------------------------

    def config(self) -> dict:
        """The hyperparameters that rebuild this module (stored in cfg.json; sae_config)."""
        found = {
            name: dtype_name(self.W_enc.dtype) if name == "dtype" else getattr(self, name)
            for name in sae_config.FIELDS
        }
        return {**found, "d_out": self.d_out if self.transcoder else None}

    @classmethod
    def from_config(
        cls, config: dict, tensors: dict[str, Tensor], backend: str | None = None
    ) -> SparseAutoencoder:
        """The module holding tensors (its state dict), as config (sae_config) describes it.

        The tensors are taken as they are (no copy); a field or tensor that does not fit
        raises ValueError/TypeError, or torch's error for the state dict.
        """
        config = sae_config.complete(config)
        options = {name: value for name, value in config.items() if name != "dtype"}
        sae = cls(**options, dtype=sae_config.dtype(config), device="meta", backend=backend)
        sae.load_state_dict(tensors, assign=True)
        return sae

    def save(self, path: str | Path, format: str = "sae_fast") -> None:
        """Write the SAE into the folder path, which appears whole: a reader sees the SAE
        saved before or this one (a folder holding other files is refused, not replaced).

        format: "sae_fast" (sae.safetensors + cfg.json) or another library's layout
        (sae_fast.formats.writable() lists them).
        """
        tensors = {name: t.detach().cpu() for name, t in self.state_dict().items()}
        formats.save(self.config(), tensors, path, format)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        format: str | None = None,
    ) -> SparseAutoencoder:
        """Load an SAE in eval mode from path, in any format sae_fast reads.

        format: None detects it (sae_fast.formats.readable() lists them); device and dtype
        override where the weights land.
        """
        config, tensors = formats.load(path, format)
        sae = cls.from_config(config, tensors, backend=backend)
        return sae.to(device=device, dtype=dtype).eval()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """module in eval mode inside the with-block; its former mode is restored after, also on
    error (batchtopk SAEs use their calibrated threshold in eval mode)."""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to the autocast dtype when autocast is on for their device, else as they are.

    torch.autocast casts only its own ops; the sparse ops need x and weights in one dtype.
    As autocast does, float64 tensors keep their dtype.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def seeded_normal(
    seed: int,
    first: int,
    rows: int,
    width: int,
    stream: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard normal draws (rows, width) for the latents [first, first + rows), the same for
    each latent whichever process draws it: blocks of _SEED_BLOCK latents, each from a
    generator of its own (sources.seeds.seeded_generator(seed, block[, stream]))."""
    parts = []
    for block in range(first // _SEED_BLOCK, (first + rows - 1) // _SEED_BLOCK + 1):
        ids = (seed, block, stream) if stream else (seed, block)
        g = seeded_generator(*ids, device=device)
        W = torch.randn(_SEED_BLOCK, width, generator=g, device=g.device)
        lo = max(first - block * _SEED_BLOCK, 0)
        parts.append(W[lo : min(first + rows - block * _SEED_BLOCK, _SEED_BLOCK)])
    return torch.cat(parts)


def data_center(x: Tensor, method: str = "geometric_median", max_iter: int = 100) -> Tensor:
    """x: (n, d) -> (d,), its mean or geometric median (Weiszfeld): an initial b_dec."""
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one activation to set b_dec from")
    if method not in ("mean", "geometric_median"):
        raise ValueError(f"method must be 'mean' or 'geometric_median', got {method!r}")
    center = x.mean(dim=0)
    return geometric_median(x, center, max_iter) if method == "geometric_median" else center


def geometric_median(x: Tensor, start: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld iterations for the point minimising the sum of distances.  x: (n, d) -> (d,)."""
    center = start
    for _ in range(max_iter):
        dist = (x - center).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        shift = (new - center).norm()
        center = new
        if shift <= tol * center.norm().clamp_min(1e-12):
            break
    return center
