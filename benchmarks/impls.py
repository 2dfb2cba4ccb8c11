"""The TopK SAEs under test: sae_fast per backend, the dense reference, and the real peers.

Each implementation is built from the same weights and offers the same passes: encode (no
grad), decode (no grad), forward (x -> x_hat), loss (differentiable) and train_step (forward,
backward, Adam, and the decoder-norm handling that library does in its own trainer):
- sae_fast and reference: loss = FVU; the trainer's optimizer (SaeAdam): the gradient parallel
  to each decoder row removed, Adam, the rows renormalised (Gao et al. 2024), one Triton pass
  per parameter on a GPU.
- sparsify (EleutherAI `eai-sparsify`, SparseCoder): as its Trainer does: rows set to unit
  norm, loss = fvu, parallel gradient removed, torch's default Adam.
- SAELens (`sae-lens`, TopKTrainingSAE): as its SAETrainer does: training_forward_pass loss
  (summed squared error, mean over tokens), gradient norm clipped to 1, Adam; it rescales
  activations by decoder norms instead of renormalising.
- sparsify[sae_fast] and saelens[sae_fast]: each peer's own step above, on the drop-in layer
  of sae_fast.integrations (FastSparseCoder; the sae_fast_topk architecture): what a user of
  that library gets by changing one line.
No AuxK: every latent is alive, so all compute the same function.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor

import sae_fast
from sae_fast import reference as ref
from sae_fast.options import check_matryoshka
from sae_fast.training.losses import matryoshka_decode
from sae_fast.training.optimizer import SaeAdam
from sae_fast.validation import dtype_name

LR = 1e-4


@dataclass
class Weights:
    """Shared parameters in sae_fast's layout: W_enc, W_dec (m, d); b_enc (m,); b_dec (d,)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor

    @classmethod
    def random(cls, d: int, m: int, dtype: torch.dtype, device: str, seed: int = 0) -> Weights:
        g = torch.Generator(device="cpu").manual_seed(seed)
        W_dec = torch.randn(m, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        b_enc = 0.01 * torch.randn(m, generator=g)
        b_dec = 0.1 * torch.randn(d, generator=g)
        tensors = (W_dec.clone(), b_enc, W_dec, b_dec)
        return cls(*(t.to(device, dtype) for t in tensors))


def activations(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 1) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device, dtype)


class Impl:
    """One TopK SAE implementation; build() before the passes."""

    name: str
    package: str | None = None  # the PyPI distribution a peer comes from

    def why_not(self, device: str) -> str | None:
        """None if this implementation can run on device, else the reason."""
        if self.package and importlib.util.find_spec(self.module) is None:
            return (
                f"{self.package} is not installed (pip install -e '.[bench]', see "
                "docs/benchmarks.md)"
            )
        return None

    def version(self) -> str | None:
        return importlib.metadata.version(self.package) if self.package else sae_fast.__version__

    def build(self, w: Weights, k: int) -> None:
        raise NotImplementedError

    def encode(self, x: Tensor):
        raise NotImplementedError

    def decode(self, code) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: Tensor) -> Tensor:
        """The training loss this library uses, differentiable."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, x: Tensor) -> None:
        raise NotImplementedError


class SaeFast(Impl):
    """sae_fast's module and the trainer's step: FVU loss, then one SaeAdam step (the
    parallel gradient removed, Adam, the decoder rows renormalised; fused on a GPU)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"sae_fast[{backend}]"

    def why_not(self, device: str) -> str | None:
        return sae_fast.backend_status(device).get(self.backend, "not registered")

    def build(self, w: Weights, k: int) -> None:
        m, d = w.W_enc.shape
        sae = sae_fast.SparseAutoencoder(
            d, m, k=k, dtype=w.W_enc.dtype, device=w.W_enc.device, backend=self.backend
        )
        sae.load_state_dict(
            {"W_enc": w.W_enc, "b_enc": w.b_enc, "W_dec": w.W_dec, "b_dec": w.b_dec}
        )
        self.sae = sae
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        self.optimizer = SaeAdam(
            sae, lr=LR, betas=(0.9, 0.999), eps=1e-8, project=True, renormalise=True
        )

    def loss(self, x: Tensor) -> Tensor:
        return ref.fvu(x, self.decode(self.encode(x)))

    def train_step(self, x: Tensor) -> None:
        self.loss(x).backward()
        self.optimizer.step()
        self.zero_grad()

    def encode(self, x: Tensor):
        return self.sae.encode(x)

    def decode(self, code) -> Tensor:
        return self.sae.decode(code)


class SaeFastMatryoshka(SaeFast):
    """sae_fast's TopK trained with the Matryoshka loss over prefixes m/8, m/4, m/2, m (the
    mean of the prefixes' FVU): what the nested prefixes add to a step."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name = f"sae_fast-matryoshka[{backend}]"

    def build(self, w: Weights, k: int) -> None:
        super().build(w, k)
        m = w.W_enc.shape[0]
        prefixes = [m // 8, m // 4, m // 2, m]
        check_matryoshka(prefixes, m, "topk")
        self.sae.matryoshka = prefixes

    def loss(self, x: Tensor) -> Tensor:
        prefixes = matryoshka_decode(self.sae, self.encode(x))  # (n, G, d)
        errors = (x[:, None] - prefixes).pow(2).sum(-1).mean(0)  # (G,)
        return errors.mean() / (x - x.mean(0)).pow(2).sum(-1).mean()  # FVU's denominator


class Reference(SaeFast):
    """The dense oracle with the same training step as sae_fast."""

    name = "reference"

    def __init__(self) -> None:
        self.backend = "torch"

    def why_not(self, device: str) -> str | None:
        return None

    def encode(self, x: Tensor):
        return ref.encode_topk(x, self.W_enc, self.b_enc, self.b_dec, self.sae.k)

    def decode(self, code) -> Tensor:
        return ref.decode(*code, self.W_dec, self.b_dec)


class _Peer(Impl):
    """A peer library's SAE given our weights, trained with torch's default Adam."""

    def adopt(self, sae: torch.nn.Module, copies: list[tuple[Tensor, Tensor]]) -> None:
        """Copy each (destination, source) pair into sae's parameters; make the optimizer."""
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)
        self.sae = sae
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=LR)

    def encode(self, x: Tensor):
        return self.sae.encode(x)


class Sparsify(_Peer):
    name = "sparsify"
    package = "eai-sparsify"
    module = "sparsify"

    def build(self, w: Weights, k: int) -> None:
        if w.W_enc.device.type == "cpu":
            # Its Triton decoder cannot take CPU tensors; this selects its eager one.
            os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
        from sparsify import SparseCoderConfig

        m, d = w.W_enc.shape
        cfg = SparseCoderConfig(num_latents=m, k=k)
        sae = self.coder_class()(d, cfg, device=w.W_enc.device, dtype=w.W_enc.dtype)
        pairs = [(sae.encoder.weight, w.W_enc), (sae.encoder.bias, w.b_enc)]
        self.adopt(sae, [*pairs, (sae.W_dec, w.W_dec), (sae.b_dec, w.b_dec)])

    def coder_class(self) -> type:
        from sparsify import SparseCoder

        return SparseCoder

    def decode(self, code) -> Tensor:
        return self.sae.decode(code.top_acts, code.top_indices)

    def loss(self, x: Tensor) -> Tensor:
        return self.sae(x).fvu

    def train_step(self, x: Tensor) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        self.loss(x).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.zero_grad()


class SAELens(_Peer):
    name = "saelens"
    package = "sae-lens"
    module = "sae_lens"

    def build(self, w: Weights, k: int) -> None:
        sae_class, config_class = self.classes()
        m, d = w.W_enc.shape
        cfg = config_class(
            d_in=d,
            d_sae=m,
            k=k,
            dtype=dtype_name(w.W_enc.dtype),
            device=str(w.W_enc.device),
        )
        sae = sae_class(cfg)
        pairs = [(sae.W_enc, w.W_enc.T), (sae.b_enc, w.b_enc)]  # SAELens's W_enc is (d, m)
        self.adopt(sae, [*pairs, (sae.W_dec, w.W_dec), (sae.b_dec, w.b_dec)])

    def classes(self) -> tuple[type, type]:
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        return TopKTrainingSAE, TopKTrainingSAEConfig

    def decode(self, code) -> Tensor:
        return self.sae.decode(code)

    def forward(self, x: Tensor) -> Tensor:
        # The module's forward: on sae_fast's layer the sparse decoder the step uses.
        return self.sae(x)

    def loss(self, x: Tensor) -> Tensor:
        from sae_lens.saes.sae import TrainStepInput

        step = TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
        return self.sae.training_forward_pass(step).loss

    def train_step(self, x: Tensor) -> None:
        self.loss(x).backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.zero_grad()


class SparsifyOnSaeFast(Sparsify):
    """sparsify's step with the one-line change: FastSparseCoder (sae_fast.integrations)."""

    name = "sparsify[sae_fast]"

    def coder_class(self) -> type:
        from sae_fast.integrations.sparsify import FastSparseCoder

        return FastSparseCoder


class SAELensOnSaeFast(SAELens):
    """SAELens's step with the one-line change: the sae_fast_topk architecture."""

    name = "saelens[sae_fast]"

    def classes(self) -> tuple[type, type]:
        from sae_fast.integrations import saelens

        return saelens.FastTopKTrainingSAE, saelens.FastTopKTrainingSAEConfig


PEERS = ("reference", "sparsify", "sparsify[sae_fast]", "saelens", "saelens[sae_fast]")


def make(name: str) -> Impl:
    """An implementation by name: sae_fast[BACKEND], sae_fast-matryoshka[BACKEND], or one of
    PEERS (the peers, and each peer's own step on sae_fast's drop-in layer)."""
    if name.startswith("sae_fast[") and name.endswith("]"):
        return SaeFast(name[len("sae_fast[") : -1])
    if name.startswith("sae_fast-matryoshka[") and name.endswith("]"):
        return SaeFastMatryoshka(name[len("sae_fast-matryoshka[") : -1])
    factories = {
        "reference": Reference,
        "sparsify": Sparsify,
        "sparsify[sae_fast]": SparsifyOnSaeFast,
        "saelens": SAELens,
        "saelens[sae_fast]": SAELensOnSaeFast,
    }
    if name not in factories:
        raise ValueError(f"unknown implementation {name!r}")
    return factories[name]()
