"""Matryoshka SAEs: the prefix loss and every gradient against the dense float64 reference,
the prefix sizes in the config (checks, save and load, other layouts refused), exact resume
and the trainer's refusals."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import assert_same_run, config, metric_rows, source

from sae_fast import SparseAutoencoder, reference
from sae_fast.checkpoint import CheckpointError
from sae_fast.options import parse_matryoshka
from sae_fast.training.config import ConfigError
from sae_fast.training.losses import LossWeights, matryoshka_decode, training_loss
from sae_fast.training.trainer import Trainer

PREFIXES = [4, 11, 24]


def _dense_code(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """The training code of x as the reference computes it, dense (n, m)."""
    pre = reference.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec)
    if sae.activation == "topk":
        values, indices = reference.topk(pre, sae.k)
        return reference.sparse_to_dense(values, indices, sae.n_latents)
    return reference.batchtopk(pre, sae.k)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_prefix_loss_and_gradients_equal_the_dense_reference(activation):
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 24, k=3, activation=activation, dtype=torch.float64,
                            matryoshka=PREFIXES).train()  # fmt: skip
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.normal_()
    x = torch.randn(13, 8, dtype=torch.float64)
    got = training_loss(sae, x, LossWeights(auxk=0))
    got.loss.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    want = reference.matryoshka_loss(x, _dense_code(sae, x), sae.W_dec, sae.b_dec, PREFIXES)
    want.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # The whole dictionary's error is still reported as recon, and one prefix is plain.
    full = (x - sae(x).x_hat).pow(2).sum(-1).mean()
    torch.testing.assert_close(got.terms["recon"], full.detach())
    assert got.terms["matryoshka"] != got.terms["recon"]
    plain = SparseAutoencoder(8, 24, k=3, activation=activation, dtype=torch.float64,
                              matryoshka=[24]).train()  # fmt: skip
    plain.load_state_dict(sae.state_dict())
    one = training_loss(plain, x, LossWeights(auxk=0))
    torch.testing.assert_close(one.loss, one.terms["recon"])


def test_prefix_sizes_are_checked_saved_and_refused_by_other_layouts(tmp_path):
    assert parse_matryoshka("4,11", 24) == PREFIXES
    assert parse_matryoshka("4,11,24", 24) == PREFIXES
    assert parse_matryoshka("24", 24) is None  # the whole dictionary alone: a plain SAE
    for spec, words in (("11,4", "ascending"), ("0,4", "ascending"), ("4,30", "ending at"),
                        ("a,b", "like 1024,4096")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            parse_matryoshka(spec, 24)
    with pytest.raises(ValueError, match="topk or batchtopk"):
        SparseAutoencoder(8, 24, activation="relu", matryoshka=PREFIXES)
    with pytest.raises(ValueError, match="ending at n_latents=24"):
        SparseAutoencoder(8, 24, k=3, matryoshka=[4, 11])
    sae = SparseAutoencoder(8, 24, k=3, matryoshka=PREFIXES)
    sae.save(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["matryoshka"] == PREFIXES
    assert SparseAutoencoder.load(tmp_path / "sae").matryoshka == PREFIXES
    with pytest.raises(CheckpointError, match="no field for its prefix sizes"):
        sae.save(tmp_path / "sparsify", format="sparsify")
    # SAELens's inference layout keeps them in metadata.sae_fast.
    sae.save(tmp_path / "lens", format="saelens")
    assert SparseAutoencoder.load(tmp_path / "lens").matryoshka == PREFIXES
    # A plain SAE's cfg.json has no matryoshka field (older sae_fast versions read it).
    SparseAutoencoder(8, 24, k=3).save(tmp_path / "plain")
    assert "matryoshka" not in json.loads((tmp_path / "plain" / "cfg.json").read_text())
    assert SparseAutoencoder.load(tmp_path / "plain").matryoshka is None
    with pytest.raises(ValueError, match="training mode"):  # a calibrated BatchTopK in eval
        nested = SparseAutoencoder(8, 24, k=3, activation="batchtopk", matryoshka=PREFIXES)
        with torch.no_grad():
            nested.threshold.fill_(0.1)
        matryoshka_decode(nested, nested.eval().encode(torch.randn(3, 8)))


def _prefix_errors(sae: SparseAutoencoder, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        z = _dense_code(sae, x)
        return [reference.matryoshka_loss(x, z, sae.W_dec, sae.b_dec, [p]).item()
                for p in (16, 64)]  # fmt: skip


def test_its_prefixes_reconstruct_better_than_a_plain_sae_s(tmp_path):
    # Same data, seed and steps: only the loss differs. A plain TopK SAE's first latents are
    # no better than any others; a Matryoshka SAE's first 16 and 64 are trained to suffice.
    found = {}
    for name, kw in (("nested", {"matryoshka": "16,64"}), ("plain", {})):
        trainer = Trainer(config(tmp_path, name, n_latents=256, steps=60, **kw), source())
        trainer.train()
        held_out = source(stream_seed=99).next_batch(512).float()
        found[name] = _prefix_errors(trainer.sae.eval(), held_out)
    nested, plain = found["nested"], found["plain"]
    assert nested[0] < 0.95 * plain[0] and nested[1] < 0.95 * plain[1]


def test_a_matryoshka_run_resumes_exactly(tmp_path):
    kw = {"n_latents": 256, "matryoshka": "16,64"}
    straight = Trainer(config(tmp_path, "straight", **kw), source())
    straight.train()
    assert straight.sae.matryoshka == [16, 64, 256]
    first = Trainer(config(tmp_path, "split", **kw), source())
    assert first.train(until=6).step == 6
    resumed = Trainer(config(tmp_path, "split", **kw), source(), resume=True)
    resumed.train()
    assert_same_run(straight, resumed)
    rows = metric_rows(resumed)
    assert rows == metric_rows(straight) and all("matryoshka" in r for r in rows)
    assert SparseAutoencoder.load(tmp_path / "straight" / "sae").matryoshka == [16, 64, 256]
    # The same prefixes spelt with the whole dictionary resume; other prefixes are refused.
    spelt = {**kw, "matryoshka": "16,64,256"}
    again = Trainer(config(tmp_path, "split", **spelt), source(), resume=True)
    assert again.step == 12
    again.close()
    with pytest.raises(ConfigError, match="matryoshka='16,128'"):
        Trainer(config(tmp_path, "split", **{**kw, "matryoshka": "16,128"}), source(), resume=True)
    # The syntax, order and activation are checked with the options, before any trainer.
    for spec, words in (("a,b", "like 1024,4096"), ("64,16", "ascending"), ("16,300", "ending")):
        with pytest.raises(ConfigError, match=words):
            config(tmp_path, "bad", n_latents=256, matryoshka=spec)
    with pytest.raises(ConfigError, match="matryoshka: matryoshka must be ascending"):
        Trainer(config(tmp_path, "bad", matryoshka="64,16"), source())
    # A checkpoint from before the option (no matryoshka key) was a plain run: not resumable
    # as a Matryoshka one.
    state_path = next((tmp_path / "split" / "checkpoints").glob("step-*")) / "train_state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["config"]["matryoshka"]
    torch.save(state, state_path)
    plain = {**kw, "matryoshka": None}
    with pytest.raises(ConfigError, match="matryoshka='16,64' \\(the checkpoint has None\\)"):
        Trainer(config(tmp_path, "split", **kw), source(), resume=state_path.parent)
    Trainer(config(tmp_path, "split", **plain), source(), resume=state_path.parent)
    with pytest.raises(ConfigError, match="matryoshka needs activation topk or batchtopk"):
        Trainer(config(tmp_path, "relu", activation="relu", matryoshka="16"), source())
