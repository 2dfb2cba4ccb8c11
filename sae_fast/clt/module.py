"""The CrossLayerTranscoder module: an encoder per layer, decoders from each layer to it and to
every later one, on the sparse ops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import formats, ops
from .. import reference as ref
from ..ops import SparseCode
from ..options import SPARSE_ACTIVATIONS
from ..sae import SparseAutoencoder, autocast_inputs, seeded_normal
from ..validation import check_activations, dtype_name
from . import config as clt_config


@dataclass
class CLTOutput:
    """What forward returns.

    y_hat: (L, ..., d_out), every layer's predicted output (its MLP output); code: SparseCode
    (L, ..., width), zero values padding rows and layers to one width; pre: the dense
    pre-activations (L, ..., m) of relu, jumprelu and batchtopk with its thresholds set, which
    compute them; None where the sparse TopK ops ran.
    """

    y_hat: Tensor
    code: SparseCode
    pre: Tensor | None = None


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (CLT) over L layers with n_latents features per layer.

    Feature j of layer i reads layer i's input x[i] (d_in) and writes to the outputs of layers
    i, i+1, ..., L-1 (d_out each): `y_hat[t] = b_dec[t] + sum(z[i] @ W_dec[i][:, t - i])` over
    i <= t (+ `x[t] @ W_skip[t].T` with a skip connection), where
    `z[i] = act(x[i] @ W_enc[i].T + b_enc[i])` (no centring: a transcoder's b_dec is its
    output's).

    Parameters (sae_fast.clt.config.tensor_shapes): W_enc (L, m, d_in), b_enc (L, m),
    W_dec[i] (m, L - i, d_out), b_dec (L, d_out); W_skip (L, d_out, d_in); jumprelu's
    log_threshold (L, m); batchtopk's buffer threshold (L,): in eval mode, once every layer's
    is set (>= 0), features above it fire; while any is negative, the batch rule applies.

    activation: topk (k features per token at each layer), batchtopk (the top n*k of a layer's
    batch, per layer, while training), relu (trained with an L1 penalty) or jumprelu. The
    TopK codes come from ops.encode_topk, never a dense (n, m) matrix; every decode is a
    sparse gather-sum (ops.decode) of the features' decoder rows to all their targets at
    once, W_dec[i] read as (m, (L - i) * d_out).

    Initialisation: encoder rows are random unit vectors; decoder columns random unit vectors
    scaled by 1 / sqrt(t + 1) for target t, which t + 1 source layers write to; biases zero.
    """

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        n_latents: int,
        *,
        k: int | None = None,
        activation: str = "topk",
        d_out: int | None = None,
        skip_connection: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        chunk_size: int | None = None,
        jumprelu_bandwidth: float = 1e-3,
        jumprelu_init_threshold: float = 1e-3,
        provenance: dict | None = None,
    ) -> None:
        super().__init__()
        clt_config.check_hyperparameters(
            n_layers, d_in, n_latents, k, activation, d_out, jumprelu_bandwidth, skip_connection
        )
        if jumprelu_init_threshold <= 0:
            raise ValueError(f"jumprelu_init_threshold must be > 0, got {jumprelu_init_threshold}")
        self.n_layers, self.d_in, self.n_latents = n_layers, d_in, n_latents
        self.d_out = d_out or d_in
        self.k, self.activation, self.skip_connection = k, activation, skip_connection
        self.backend, self.chunk_size = backend, chunk_size
        self.jumprelu_bandwidth = jumprelu_bandwidth
        self.provenance = dict(provenance or {})
        self.latent_offset = 0  # the first feature this module holds (a shard's, parallel/clt.py)
        factory = {"dtype": dtype, "device": device}
        L, m = n_layers, n_latents
        W_enc = torch.randn(L, m, d_in, **factory)
        self.W_enc = nn.Parameter(W_enc / W_enc.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(L, m, **factory))
        decoders = []
        for i in range(L):
            W = torch.randn(m, L - i, self.d_out, **factory)
            decoders.append(nn.Parameter(_decoder_init(W, L)))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(L, self.d_out, **factory))
        if skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, self.d_out, d_in, **factory))
        if activation == "jumprelu":
            log_t = torch.full((L, m), math.log(jumprelu_init_threshold), **factory)
            self.log_threshold = nn.Parameter(log_t)
        if activation == "batchtopk":
            self.register_buffer("threshold", torch.full((L,), -1.0, **factory))

    @torch.no_grad()
    def seed_parameters_(self, seed: int) -> None:
        """Initialise W_enc and the decoders as the constructor does, but from seed alone, the
        same for each feature whichever process holds it (sae.seeded_normal: a shard holding
        features [latent_offset, ...) gets the values one CLT of all of them gives them)."""
        L, rows = self.n_layers, self.W_enc.shape[1]

        def normal(width: int, stream: int) -> Tensor:
            W = seeded_normal(seed, self.latent_offset, rows, width, stream, self.W_enc.device)
            return W.to(self.W_enc.dtype)

        for i in range(L):
            W = normal(self.d_in, stream=2 + i)
            self.W_enc[i].copy_(W / W.norm(dim=-1, keepdim=True))
            W = normal((L - i) * self.d_out, stream=2 + L + i).view(rows, L - i, self.d_out)
            self.W_dec[i].copy_(_decoder_init(W, L))

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"n_layers={self.n_layers}, d_in={self.d_in}, d_out={self.d_out}, "
            f"n_latents={self.n_latents}{k}, activation={self.activation!r}"
        )

    # --- encoding -------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> Tensor:
        check_activations(x, self.d_in, self.W_enc)
        if x.dim() < 2 or x.shape[0] != self.n_layers:
            raise ValueError(
                f"x must be (n_layers={self.n_layers}, ..., d_in={self.d_in}): every layer's "
                f"input stacked, got {tuple(x.shape)}"
            )
        return x

    def encode(self, x: Tensor) -> SparseCode:
        """x: (L, ..., d_in) -> SparseCode (L, ..., width)."""
        return self._encode(x)[0]

    def _sparse_path(self) -> bool:
        """Whether the TopK ops compute the code (topk; batchtopk training or uncalibrated)."""
        if self.activation != "batchtopk":
            return self.activation == "topk"
        return self.training or bool((self.threshold < 0).any())

    def _encode(self, x: Tensor) -> tuple[SparseCode, Tensor | None]:
        """x: (L, ..., d_in) -> (code (L, ..., width), pre (L, ..., m) or None)."""
        self._check_input(x)
        lead = x.shape[1:-1]
        if self._sparse_path():
            return self._sparse_codes(x)[0], None
        pre = self.pre_activations(x)
        code = _stack(self._dense_codes(pre), lead)
        return code, pre.reshape(self.n_layers, *lead, self.n_latents)

    def pre_activations(self, x: Tensor) -> Tensor:
        """Every layer's dense pre-activations x[i] @ W_enc[i].T + b_enc[i]: x (L, ..., d_in)
        -> (L, n, m), n the tokens of the leading dimensions (the dense activations' path)."""
        flat, W, b = autocast_inputs(
            x.reshape(self.n_layers, -1, self.d_in), self.W_enc, self.b_enc
        )
        return torch.baddbmm(b[:, None], flat, W.transpose(1, 2))

    def encode_with_auxk(
        self, x: Tensor, dead_mask: Tensor, k_aux: int
    ) -> tuple[SparseCode, SparseCode]:
        """topk/batchtopk training: (code (L, n, width), aux_code (L, n, k_aux)) from one
        encoder pass per layer.  x: (L, n, d_in); dead_mask: (L, m) bool.

        aux_code holds, per layer, the top k_aux of relu(pre) among that layer's dead features
        (Gao et al. 2024's AuxK, ops.encode_topk_auxk); a layer with none dead gives zeros.
        """
        if self.activation not in SPARSE_ACTIVATIONS:
            raise ValueError(f"AuxK needs activation topk or batchtopk, not {self.activation!r}")
        self._check_input(x)
        held = self.W_enc.shape[1]  # the features this module holds at each layer
        if dead_mask.shape != (self.n_layers, held) or dead_mask.dtype != torch.bool:
            raise ValueError(
                f"dead_mask must be bool (n_layers={self.n_layers}, {held} features), "
                f"got {dead_mask.dtype} {tuple(dead_mask.shape)}"
            )
        return self._sparse_codes(x, dead_mask, k_aux)

    def count_features(self, mask: Tensor) -> Tensor:
        """(L,): how many features of each layer mask (L, the features this module holds)
        marks (a latent shard's counts are the whole CLT's)."""
        return mask.sum(dim=1)

    def _sparse_codes(
        self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> tuple[SparseCode, SparseCode | None]:
        """Each layer's TopK (or batch TopK) code of x (L, ..., d_in), stacked, and with a
        dead_mask (L, m) the AuxK codes of the same encoder passes."""
        L, lead = self.n_layers, x.shape[1:-1]
        flat = x.reshape(L, -1, self.d_in)
        W_enc, b_enc = self.W_enc.unbind(0), self.b_enc.unbind(0)
        codes, aux = [], []
        for i in range(L):
            dead = None if dead_mask is None else dead_mask[i]
            code, extra = self._topk_layer(flat[i], W_enc[i], b_enc[i], dead, k_aux)
            codes.append(code)
            aux.append(extra)
        return _stack(codes, lead), None if dead_mask is None else _stack(aux, lead)

    def _topk_layer(
        self, x: Tensor, W_enc: Tensor, b_enc: Tensor, dead: Tensor | None, k_aux: int
    ) -> tuple[SparseCode, SparseCode | None]:
        """One layer's TopK (or batch TopK) code of x (n, d_in), and with dead (m,) its AuxK
        code from the same pass."""
        inputs = autocast_inputs(x, W_enc, b_enc, W_enc.new_zeros(self.d_in))

        def topk(width: int) -> SparseCode:
            return self._layer_topk(inputs, width)

        n = x.shape[0]
        width = (
            self.k if self.activation == "topk" else ops.batch_topk_width(self.k, self.n_latents)
        )
        aux = None
        if dead is None:
            code = topk(width)
        else:
            code, aux = self._layer_topk_auxk(inputs, width, dead, k_aux)
        if self.activation == "batchtopk":
            code = ops.batch_topk(topk, n, self.n_latents, n * self.k, width, code)
        return code, aux

    def _layer_topk(self, inputs: tuple[Tensor, ...], width: int) -> SparseCode:
        """ops.encode_topk of one layer's (x, W_enc, b_enc, zero centre)."""
        return ops.encode_topk(*inputs, width, backend=self.backend, chunk_size=self.chunk_size)

    def _layer_topk_auxk(
        self, inputs: tuple[Tensor, ...], width: int, dead: Tensor, k_aux: int
    ) -> tuple[SparseCode, SparseCode]:
        """ops.encode_topk_auxk of one layer's (x, W_enc, b_enc, zero centre)."""
        options = {"backend": self.backend, "chunk_size": self.chunk_size}
        return ops.encode_topk_auxk(*inputs, width, dead, k_aux, **options)

    def _gather(self, values: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
        """sum_j values[:, j] * rows[indices[:, j]]: (n, width) -> (n, rows' width)."""
        zero = rows.new_zeros(rows.shape[1])
        return ops.decode(values, indices, rows, zero, backend=self.backend)

    def _dense_codes(self, pre: Tensor) -> list[SparseCode]:
        """The sparse codes (n, width) of each layer's dense activation of pre (L, n, m).

        A row's code holds its active features in index order, padded with zeros. For
        jumprelu it also holds the inactive features within half a bandwidth below their
        threshold: their value is 0, but the threshold's straight-through gradient reads the
        gradient at them, which the gather-sum's backward then gives exactly.
        """
        if self.activation == "relu":
            z, keep = torch.relu(pre), pre > 0
        elif self.activation == "batchtopk":
            threshold = self.threshold.to(pre.dtype)[:, None, None]
            z = ref.threshold_relu(pre, threshold)
            keep = z > 0
        else:
            threshold = self.log_threshold.exp().to(pre.dtype)
            bandwidth = self.jumprelu_bandwidth
            z = torch.stack(
                [ref.jumprelu(p, t, bandwidth) for p, t in zip(pre, threshold, strict=True)]
            )
            # The backward's own window test, so rounding cannot drop an entry it reads.
            near = (pre - threshold[:, None]).abs() < bandwidth / 2
            keep = (pre > threshold[:, None]) | near
        width = max(int(keep.sum(dim=-1).max()) if keep.numel() else 0, 1)
        # The kept entries first, in index order (a stable sort); the rest pad with zeros.
        order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True)
        indices = order.indices[..., :width]
        values = z.gather(-1, indices)
        return [SparseCode(values[i], indices[i]) for i in range(len(pre))]

    # --- decoding -------------------------------------------------------------------------

    def decode(self, code: SparseCode) -> Tensor:
        """SparseCode (L, ..., width) -> y_hat (L, ..., d_out), without the skip connection.

        Source layer i's code gathers its features' decoder rows to all targets i..L-1 in one
        sparse gather-sum; target t adds what every source i <= t wrote to it.
        """
        values, indices = code
        L, d_out = self.n_layers, self.d_out
        if values.dim() < 2 or values.shape[0] != L:
            raise ValueError(f"code must be (n_layers={L}, ..., width), got {tuple(values.shape)}")
        lead, width = values.shape[1:-1], values.shape[-1]
        values, indices = values.reshape(L, -1, width), indices.reshape(L, -1, width)
        n = values.shape[1]
        written: list[list[Tensor]] = [[] for _ in range(L)]
        for i, W in enumerate(self.W_dec):
            v, rows = autocast_inputs(values[i], W.reshape(W.shape[0], (L - i) * d_out))
            out = self._gather(v, indices[i], rows).reshape(n, L - i, d_out)
            for t in range(i, L):
                written[t].append(out[:, t - i])
        (b_dec,) = autocast_inputs(values, self.b_dec)[1:]
        y_hat = torch.stack([b_dec[t] + sum(written[t]) for t in range(L)])
        return y_hat.reshape(L, *lead, d_out)

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip connection's part of the outputs, x[t] @ W_skip[t].T: (L, ..., d_out);
        None without one."""
        if not self.skip_connection:
            return None
        flat, W_skip = autocast_inputs(x.reshape(self.n_layers, -1, self.d_in), self.W_skip)
        out = torch.bmm(flat, W_skip.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.d_out)

    def forward(self, x: Tensor) -> CLTOutput:
        """x: (L, ..., d_in), every layer's input stacked -> CLTOutput, y_hat (L, ..., d_out)."""
        code, pre = self._encode(x)
        y_hat = self.decode(code)
        skipped = self.skip(x)
        return CLTOutput(y_hat if skipped is None else y_hat + skipped, code, pre)

    @torch.no_grad()
    def fold_scales_(self, input_scale: Tensor, output_scale: Tensor) -> None:
        """Make a CLT trained to predict output_scale[t] * y[t] from input_scale[i] * x[i]
        compute y from raw x: the per-layer normalisation folded in.

        input_scale, output_scale: (L,) finite and positive. W_enc[i] takes input_scale[i], so
        every pre-activation, and which features fire, stay as trained; the decoders to
        target t, b_dec[t] and W_skip[t] (times input_scale[t]) are divided by
        output_scale[t].
        """
        scales = []
        for name, scale in (("input_scale", input_scale), ("output_scale", output_scale)):
            scale = torch.as_tensor(scale, dtype=torch.float64)
            if scale.shape != (self.n_layers,) or not bool(
                (scale > 0).all() & scale.isfinite().all()
            ):
                raise ValueError(
                    f"{name} must hold n_layers={self.n_layers} finite positive numbers, "
                    f"got {scale.tolist()}"
                )
            scales.append(scale.to(self.W_enc.device))
        a, c = scales
        self.W_enc.mul_(a[:, None, None].to(self.W_enc.dtype))
        for i, W in enumerate(self.W_dec):
            W.div_(c[i:, None].to(W.dtype))
        self.b_dec.div_(c[:, None].to(self.b_dec.dtype))
        if self.skip_connection:
            self.W_skip.mul_((a / c)[:, None, None].to(self.W_skip.dtype))

    def layer_transcoder(self, layer: int) -> SparseAutoencoder:
        """Layer `layer`'s features alone, as a transcoder from that layer's input to its own
        output: their encoders (and thresholds), their decoders to that layer and
        b_dec[layer]; their writes to later layers and the skip connection are left out
        (its prediction is not the CLT's). What a dashboard of the
        layer's features reads: its code is this CLT's code of the layer. Its provenance
        names the model and the layer's hook points (hook_in, hook_out)."""
        if not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}, got {layer!r}")
        sae = SparseAutoencoder(
            self.d_in, self.n_latents, k=self.k, activation=self.activation, transcoder=True,
            d_out=self.d_out, jumprelu_bandwidth=self.jumprelu_bandwidth,
            dtype=self.W_enc.dtype, device=self.W_enc.device, backend=self.backend,
        )  # fmt: skip
        tensors = {"W_enc": self.W_enc[layer], "b_enc": self.b_enc[layer],
                   "W_dec": self.W_dec[layer][:, 0], "b_dec": self.b_dec[layer]}  # fmt: skip
        if self.activation == "jumprelu":
            tensors["log_threshold"] = self.log_threshold[layer]
        if self.activation == "batchtopk":
            tensors["threshold"] = self.threshold[layer]
        sae.load_state_dict({name: t.detach().clone() for name, t in tensors.items()})
        record = self.provenance
        train = {k: v for k, v in (record.get("train") or {}).items() if k not in ("clt", "layers")}
        sae.provenance = {
            key: value
            for key, value in (
                ("model", record.get("model")),
                ("hook_in", clt_config.recorded_hook(record, "hooks_in", layer)),
                ("hook_out", clt_config.recorded_hook(record, "hooks_out", layer)),
                ("train", train or None),
            )
            if value is not None
        }
        return sae.train(self.training)

    # --- checkpoints ----------------------------------------------------------------------

    def config(self) -> dict:
        """The hyperparameters that rebuild this module (sae_fast.clt.config)."""
        found = {name: getattr(self, name) for name in clt_config.FIELDS if name != "dtype"}
        found["d_out"] = self.d_out if self.d_out != self.d_in else None
        return {**found, "dtype": dtype_name(self.W_enc.dtype)}

    @classmethod
    def from_config(
        cls, config: dict, tensors: dict[str, Tensor], backend: str | None = None
    ) -> CrossLayerTranscoder:
        """The module holding tensors (its state dict, taken as they are), as config says."""
        config = clt_config.complete(config)
        options = {name: value for name, value in config.items() if name != "dtype"}
        clt = cls(**options, dtype=clt_config.dtype(config), device="meta", backend=backend)
        clt.load_state_dict(tensors, assign=True)
        return clt

    def save(self, path: str | Path, format: str = "sae_fast") -> None:
        """Write the CLT into the folder path, which appears whole.

        format: "sae_fast", "circuit-tracer" or "llamascopium"
        (sae_fast.formats.writable("clt") lists them).
        """
        tensors = {name: t.detach().cpu() for name, t in self.state_dict().items()}
        formats.save(self.config(), tensors, path, format, kind="clt")

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        format: str | None = None,
    ) -> CrossLayerTranscoder:
        """Load a CLT in eval mode from path in any layout sae_fast reads (format None
        detects it; sae_fast.formats.readable("clt") lists them)."""
        config, tensors = formats.load(path, format, kind="clt")
        clt = cls.from_config(config, tensors, backend=backend)
        return clt.to(device=device, dtype=dtype).eval()


def _decoder_init(W: Tensor, n_layers: int) -> Tensor:
    """A source layer's initial decoders from normal draws W (m, targets, d_out), its writes
    to the last `targets` of n_layers layers: unit vectors, scaled by 1 / sqrt(t + 1) for
    target t, which t + 1 source layers write to."""
    first = n_layers - W.shape[1]
    fan_in = torch.arange(first + 1, n_layers + 1, dtype=W.dtype, device=W.device).sqrt()
    return W / W.norm(dim=-1, keepdim=True) / fan_in[:, None]


def _stack(codes: list[SparseCode], lead: tuple[int, ...]) -> SparseCode:
    """Per-layer codes (n, w_i) as one (L, *lead, max w_i), zero-padded."""
    width = max(code.values.shape[-1] for code in codes)
    values = torch.stack([_pad(code.values, width) for code in codes])
    indices = torch.stack([_pad(code.indices, width) for code in codes])
    L = len(codes)
    return SparseCode(values.reshape(L, *lead, width), indices.reshape(L, *lead, width))


def _pad(t: Tensor, width: int) -> Tensor:
    """t (n, w) padded with zeros to (n, width): a code's padding (value 0, index 0)."""
    return nn.functional.pad(t, (0, width - t.shape[-1]))
