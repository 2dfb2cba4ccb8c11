"""sparsify checkpoints: what SparseCoder itself saves loads as the same function, and back.

Each SparseCoder gets random weights (nonzero biases, decoder rows of norms 0.5 to 2), is
saved with its own save_to_disk and loaded with SparseAutoencoder.load (format detected). The
mapping is the identity (encoder.weight is our W_enc), so ours must give the same
reconstruction, the same top-k latents and the same gradients of the reconstruction MSE with
respect to x and every weight. CI installs eai-sparsify with the `bench` extra; without it
these tests skip.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from sae_fast import CheckpointError, SparseAutoencoder, formats
from sae_fast import reference as ref

# sparsify picks its decoder once, at import: the Triton one (CUDA tensors only) wherever triton
# is installed. These tests, and tests/test_peers.py after them, run it on the CPU.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is the `bench` extra")

D, M, K, N = 12, 40, 5, 24
ATOL, RTOL = 2e-5, 1e-4
_OURS = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
_OURS["W_skip"] = "W_skip"


@pytest.fixture(autouse=True)
def eager_decoder(monkeypatch):
    """The CPU decoder even where something imported sparsify before the line above."""
    from sparsify import sparse_coder, utils

    monkeypatch.setattr(sparse_coder, "decoder_impl", utils.eager_decode)


def coder(d: int = D, seed: int = 0, **cfg) -> sparsify.SparseCoder:
    """A SparseCoder with random weights: nonzero biases, decoder norms 0.5 to 2."""
    cfg = {"num_latents": M, "k": K, **cfg}
    sae = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = torch.randn(sae.W_dec.shape, generator=g)
        norms = 0.5 + 1.5 * torch.rand(sae.num_latents, 1, generator=g)
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True) * norms)
        sae.encoder.weight.copy_(0.3 * torch.randn(sae.encoder.weight.shape, generator=g))
        sae.encoder.bias.copy_(0.2 * torch.randn(sae.num_latents, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d, generator=g))
        if sae.W_skip is not None:
            sae.W_skip.copy_(0.1 * torch.randn(d, d, generator=g))
    return sae


def inputs(d: int = D, seed: int = 1) -> torch.Tensor:
    return 1.5 * torch.randn(N, d, generator=torch.Generator().manual_seed(seed)) + 0.3


def assert_same_function(theirs: sparsify.SparseCoder, ours: SparseAutoencoder, x) -> None:
    """Same x_hat, top-k latents and MSE gradients (x and every weight)."""
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    # encode then decode: what its forward returns as sae_out, except with multi_topk, where
    # forward returns the 4k-latent decode that its Multi-TopK loss scores.
    acts, indices, _ = theirs.encode(x_theirs)
    x_hat, out = theirs.decode(acts, indices), ours(x_ours)
    if theirs.W_skip is not None:  # as its forward adds it
        x_hat = x_hat + x_theirs @ theirs.W_skip.mT
    torch.testing.assert_close(out.x_hat, x_hat, atol=ATOL, rtol=RTOL)
    if not theirs.cfg.multi_topk:
        with torch.no_grad():
            torch.testing.assert_close(theirs(x).sae_out, out.x_hat, atol=ATOL, rtol=RTOL)
    m = ours.n_latents
    z_theirs = ref.sparse_to_dense(acts, indices, m)
    z_ours = ref.sparse_to_dense(out.code.values, out.code.indices, m)
    assert torch.equal(z_ours != 0, z_theirs != 0), "different active latents"
    torch.testing.assert_close(z_ours, z_theirs, atol=ATOL, rtol=RTOL)

    ref.mse(x, x_hat).backward()
    ref.mse(x, out.x_hat).backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-6, rtol=1e-4)
    params = dict(ours.named_parameters())
    for theirs_name, p in theirs.named_parameters():
        ours_grad = params[_OURS[theirs_name]].grad
        torch.testing.assert_close(ours_grad, p.grad, atol=1e-6, rtol=1e-4, msg=theirs_name)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"num_latents": 0, "expansion_factor": 3},  # the width from d_in * expansion_factor
        {"normalize_decoder": False, "multi_topk": True},  # training options only
    ],
    ids=["num_latents", "expansion_factor", "training-options"],
)
def test_sparsify_checkpoint_loads_as_the_same_function(tmp_path, cfg):
    theirs = coder(**cfg)
    theirs.save_to_disk(tmp_path / "layers.3")
    assert formats.detect(tmp_path / "layers.3") == "sparsify"
    ours = SparseAutoencoder.load(tmp_path / "layers.3")
    assert (ours.activation, ours.d_in, ours.n_latents, ours.k) == (
        "topk",
        D,
        theirs.num_latents,
        K,
    )
    assert_same_function(theirs, ours, inputs())


def test_a_run_folder_with_one_hook_point_loads_it(tmp_path):
    theirs = coder()
    theirs.save_to_disk(tmp_path / "run" / "layers.3")
    (tmp_path / "run" / "config.json").write_text("{}")  # the trainer's own config beside it
    assert formats.detect(tmp_path / "run") == "sparsify"
    assert_same_function(theirs, SparseAutoencoder.load(tmp_path / "run"), inputs())

    coder(seed=1).save_to_disk(tmp_path / "run" / "layers.5.mlp")
    with pytest.raises(CheckpointError, match=r"2 hook points \['layers.3', 'layers.5.mlp'\]"):
        SparseAutoencoder.load(tmp_path / "run")


@pytest.mark.parametrize(
    "cfg",
    [{"transcode": True}, {"skip_connection": True}, {"transcode": True, "skip_connection": True}],
    ids=["transcoder", "skip-connection", "skip-transcoder"],
)
def test_transcoders_and_skip_connections_load_as_the_same_function(tmp_path, cfg):
    theirs = coder(**cfg)
    theirs.save_to_disk(tmp_path)
    ours = SparseAutoencoder.load(tmp_path)
    assert (ours.transcoder, ours.skip_connection) == (
        theirs.cfg.transcode,
        "skip_connection" in cfg,
    )
    assert ours.d_out == D
    assert_same_function(theirs, ours, inputs())
    ours.save(tmp_path / "back", format="sparsify")  # and back, into sparsify itself
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "back")
    assert (again.cfg.transcode, again.cfg.skip_connection) == (
        theirs.cfg.transcode,
        theirs.cfg.skip_connection,
    )
    ours.zero_grad()
    assert_same_function(again, ours, inputs(seed=2))


def test_options_sae_fast_cannot_compute_are_refused(tmp_path):
    coder(activation="groupmax", num_latents=40, k=4).save_to_disk(tmp_path)
    with pytest.raises(CheckpointError, match="activation 'groupmax'"):
        SparseAutoencoder.load(tmp_path)


def test_bad_folders_say_what_is_wrong(tmp_path):
    coder().save_to_disk(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "sae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no sae.safetensors"):
        SparseAutoencoder.load(tmp_path / "no-weights")

    coder().save_to_disk(tmp_path / "signed")  # the older EleutherAI `sae` option
    cfg = json.loads((tmp_path / "signed" / "cfg.json").read_text())
    (tmp_path / "signed" / "cfg.json").write_text(json.dumps({**cfg, "signed": True}))
    with pytest.raises(CheckpointError, match="signed=true is not supported"):
        SparseAutoencoder.load(tmp_path / "signed")

    coder().save_to_disk(tmp_path / "wrong-width")
    cfg = json.loads((tmp_path / "wrong-width" / "cfg.json").read_text())
    (tmp_path / "wrong-width" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 41}))
    with pytest.raises(
        CheckpointError, match=r"'encoder.weight' has shape \(40, 12\), expected \(41, 12\)"
    ):
        SparseAutoencoder.load(tmp_path / "wrong-width")

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint sae_fast reads"):
        SparseAutoencoder.load(tmp_path / "empty")


def test_our_topk_saved_as_sparsify_loads_in_sparsify(tmp_path):
    torch.manual_seed(0)
    ours = SparseAutoencoder(D, M, k=K)
    with torch.no_grad():
        ours.W_dec.mul_(0.5 + 1.5 * torch.rand(M, 1))
        ours.b_enc.normal_(0, 0.2)
        ours.b_dec.normal_(0, 0.2)
    ours.save(tmp_path / "layers.0", format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.0")
    assert (theirs.num_latents, theirs.cfg.k, theirs.d_in) == (M, K, D)
    assert_same_function(theirs, ours, inputs())
    back = SparseAutoencoder.load(tmp_path / "layers.0")
    for name, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_bfloat16_survives_both_ways(tmp_path):
    ours = SparseAutoencoder(D, M, k=K, dtype=torch.bfloat16)
    ours.save(tmp_path, format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path)
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs.W_dec, ours.W_dec)
    theirs.save_to_disk(tmp_path / "again")
    back = SparseAutoencoder.load(tmp_path / "again")
    assert back.W_enc.dtype == torch.bfloat16 and torch.equal(back.W_enc, ours.W_enc)


def test_what_sparsify_cannot_hold_is_not_saved(tmp_path):
    with pytest.raises(CheckpointError, match="per-row top-k only; this SAE is 'relu'"):
        SparseAutoencoder(D, M, activation="relu").save(tmp_path, format="sparsify")
    with pytest.raises(CheckpointError, match="input_norm='layer_norm'"):
        SparseAutoencoder(D, M, k=K, input_norm="layer_norm").save(tmp_path, format="sparsify")
    wide = SparseAutoencoder(D, M, k=K, transcoder=True, d_out=D + 1)
    with pytest.raises(CheckpointError, match="maps d_in=12 to d_out=13"):
        wide.save(tmp_path, format="sparsify")


def test_saelens_sparsify_loader_is_wrong_where_ours_is_right(tmp_path):
    """SAELens 6's sparsify_disk_loader transposes W_dec and, with sparsify's default
    normalize_decoder=True, sets apply_b_dec_to_input=False, dropping the b_dec subtraction.
    A square coder (d == m) loads there and computes something else; others fail to load."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is the `bench` extra")
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    theirs = coder(d=16, num_latents=16)
    theirs.save_to_disk(tmp_path / "layers.3")  # their loader wants a layers.N folder name
    x = inputs(d=16)
    ours = SparseAutoencoder.load(tmp_path / "layers.3")
    assert_same_function(theirs, ours, x)

    saelens = sae_lens.SAE.load_from_disk(
        tmp_path / "layers.3", dtype="float32", converter=sparsify_disk_loader
    )
    assert not saelens.cfg.apply_b_dec_to_input
    assert torch.equal(saelens.W_dec, theirs.W_dec.T)
    with torch.no_grad():
        want = theirs(x).sae_out  # its forward, which this coder's encode + decode equal
        assert (saelens(x) - want).abs().max() > 1.0
        assert (ours(x).x_hat - want).abs().max() < 1e-4

    coder().save_to_disk(tmp_path / "wide" / "layers.3")  # d != m: the transpose cannot load
    with pytest.raises(RuntimeError, match="size mismatch for W_dec"):
        sae_lens.SAE.load_from_disk(
            tmp_path / "wide" / "layers.3", dtype="float32", converter=sparsify_disk_loader
        )
