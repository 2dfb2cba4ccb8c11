"""The sparsify drop-in against the installed eai-sparsify: FastSparseCoder gives sparsify's
SparseCoder's outputs and gradients with the same weights, sparsify's Trainer trains it as it
trains its own, and what it saves loads in sparsify without sae_fast.

Comparisons are in float64 (the two differ only in the order of their sums). sparsify's TopK
order within a row is unspecified, so the codes are compared row by row in sorted order.
"""

from __future__ import annotations

import os

import pytest
import torch
from integrations import require, without_sae_fast

# sparsify's Triton decoder cannot take CPU tensors; this selects its eager one, as the
# benchmark does (it must be set before sparsify is imported).
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sparsify = require("sparsify")
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from sae_fast.integrations import sparsify as fast_sparsify  # noqa: E402

D, M, K, N = 24, 96, 5, 37
TOL = {"atol": 1e-12, "rtol": 1e-10}


def pair(d_out: int = D, **cfg) -> tuple[SparseCoder, fast_sparsify.FastSparseCoder]:
    """(sparsify's SparseCoder, ours from fast()) with random weights and biases."""
    torch.manual_seed(0)
    config = SparseCoderConfig(num_latents=M, **{"k": K, **cfg})
    theirs = SparseCoder(D, config, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs.W_dec.copy_(torch.randn(theirs.W_dec.shape, generator=g, dtype=torch.float64))
        theirs.encoder.bias.copy_(0.1 * torch.randn(M, generator=g, dtype=torch.float64))
        theirs.b_dec.copy_(torch.randn(theirs.b_dec.shape, generator=g, dtype=torch.float64))
        if theirs.W_skip is not None:
            theirs.W_skip.copy_(0.1 * torch.randn(theirs.W_skip.shape, generator=g).double())
    return theirs, fast_sparsify.fast(theirs)


def sorted_code(acts: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's (acts, indices) ordered by index: comparable whatever order topk gave."""
    order = indices.argsort(dim=-1)
    return acts.gather(-1, order), indices.gather(-1, order)


def run(coder, x, y=None, dead=None) -> dict:
    coder.zero_grad()
    out = coder(x, y, dead_mask=dead)
    loss = out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8  # sparsify's Trainer's sum
    loss.backward()
    return {
        "out": out,
        "code": sorted_code(out.latent_acts.detach(), out.latent_indices),
        "grads": {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None},
    }


CONFIGS = {
    "topk": {},
    "multi_topk": {"multi_topk": True},
    "skip transcoder": {"transcode": True, "skip_connection": True},
}
DEAD = {
    "no mask": None,
    "few dead": torch.arange(M) % 13 == 0,
    "many dead": torch.arange(M) % 3 > 0,
}


@pytest.mark.parametrize("dead", DEAD.values(), ids=DEAD.keys())
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_and_gradients_equal_sparsify(cfg, dead):
    theirs, ours = pair(**cfg)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = y if cfg.get("transcode") else None
    got, want = run(ours, x, y, dead), run(theirs, x, y, dead)
    for field in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(
            getattr(got["out"], field), getattr(want["out"], field), **TOL, msg=field
        )
    if dead is not None:
        assert float(want["out"].auxk_loss.detach()) > 0
    for a, b in zip(got["code"], want["code"], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, **TOL, msg=f"grad of {name}")


def test_encode_decode_and_rows_with_few_positive_pre_activations():
    theirs, ours = pair()
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0] = theirs.b_dec.detach()  # row 0: pre-activations are the biases alone
    with torch.no_grad():
        ours.encoder.bias.copy_(-torch.rand(M).double())  # all negative: row 0 has none
        theirs.encoder.bias.copy_(ours.encoder.bias)
    enc_ours, enc_theirs = ours.encode(x), theirs.encode(x)
    assert enc_ours.pre_acts is None, "the dense pre-activations are never built"
    a = sorted_code(enc_ours.top_acts.detach(), enc_ours.top_indices)
    b = sorted_code(enc_theirs.top_acts.detach(), enc_theirs.top_indices)
    torch.testing.assert_close(a[0][1:], b[0][1:], **TOL)
    torch.testing.assert_close(a[1][1:], b[1][1:])
    assert float(a[0][0].abs().sum()) == 0 == float(b[0][0].abs().sum())
    torch.testing.assert_close(
        ours.decode(enc_ours.top_acts, enc_ours.top_indices),
        theirs.decode(enc_theirs.top_acts, enc_theirs.top_indices),
        **TOL,
    )
    torch.testing.assert_close(ours(x).sae_out, theirs(x).sae_out, **TOL)


def test_leading_dims_and_other_dtypes_as_sparsify_takes_them():
    theirs, ours = pair()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got, want = ours.encode(x), theirs.encode(x)
    assert got.top_acts.shape == want.top_acts.shape == (2, 5, K)
    a, b = sorted_code(got.top_acts, got.top_indices), sorted_code(want.top_acts, want.top_indices)
    torch.testing.assert_close(a, b, **TOL)
    # bf16 activations into a float64 coder: sparsify's x - b_dec promotes them; so does ours.
    xb = x[0].to(torch.bfloat16)
    torch.testing.assert_close(ours(xb).sae_out, theirs(xb).sae_out, **TOL)


def test_groupmax_runs_sparsifys_code():
    theirs, ours = pair(activation="groupmax", k=4)
    x = torch.randn(N, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x).sae_out, theirs(x).sae_out, **TOL)
    assert ours.encode(x).pre_acts is not None


def test_fast_refuses_what_is_not_a_sparse_coder():
    with pytest.raises(TypeError, match="coder must be a sparsify SparseCoder"):
        fast_sparsify.fast(torch.nn.Linear(2, 2))


# --- sparsify's Trainer --------------------------------------------------------------------------


def train(tmp_path, name: str) -> dict[str, torch.nn.Module]:
    """sparsify's Trainer on a tiny random GPT-2 and in-memory tokens: its SAEs by hookpoint."""
    from datasets import Dataset
    from sparsify import TrainConfig, Trainer
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    tokens = torch.randint(0, 100, (64, 16), generator=torch.Generator().manual_seed(7))
    data = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(
        # 2 of 512 latents per token: a step fires some, and those that did not are dead.
        SparseCoderConfig(num_latents=512, k=2), batch_size=8,
        log_to_wandb=False, save_dir=str(tmp_path), run_name=name, save_every=100,
        auxk_alpha=1 / 32, dead_feature_threshold=64, layers=[0, 1], optimizer="adam",
        lr=3e-3,
    )  # fmt: skip
    trainer = Trainer(cfg, data, model)
    trainer.fit()
    dead = [bool((since > cfg.dead_feature_threshold).any()) for since in
            trainer.num_tokens_since_fired.values()]  # fmt: skip
    assert any(dead), "AuxK must have had dead latents"
    return trainer.saes


def test_trainer_trains_ours_as_it_trains_its_own(tmp_path):
    theirs = train(tmp_path, "theirs")
    with fast_sparsify.use_in_trainer():
        ours = train(tmp_path, "ours")
    assert sparsify.trainer.SparseCoder is SparseCoder, "the block restores sparsify's class"
    assert {type(s) for s in ours.values()} == {fast_sparsify.FastSparseCoder}
    for hook, sae in theirs.items():
        for (name, p), q in zip(sae.named_parameters(), ours[hook].parameters(), strict=True):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=f"{hook}.{name}")
    # What it saved loads in sparsify alone, and gives the same outputs.
    folder = tmp_path / "ours" / "h.0"
    x = torch.randn(20, 32)
    want = ours["h.0"](x).sae_out.detach()
    loads = (
        f"from sparsify import SparseCoder\ncoder = SparseCoder.load_from_disk({str(folder)!r})\n"
        "assert type(coder) is SparseCoder\ny = coder(x).sae_out"
    )
    torch.testing.assert_close(without_sae_fast(loads, x, tmp_path)[0], want)
    loaded = fast_sparsify.FastSparseCoder.load_from_disk(folder)
    assert type(loaded) is fast_sparsify.FastSparseCoder
    torch.testing.assert_close(loaded(x).sae_out, want)
    many = fast_sparsify.FastSparseCoder.load_many(str(tmp_path / "ours"), local=True)
    assert {type(c) for c in many.values()} == {fast_sparsify.FastSparseCoder}
    torch.testing.assert_close(many["h.0"](x).sae_out, want)
