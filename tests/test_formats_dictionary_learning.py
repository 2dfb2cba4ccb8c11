"""dictionary_learning checkpoints (ae.pt + config.json) against the library's own forward.

The oracle below is each dictionary class's encode/decode from saprmarks/dictionary_learning
(dictionary.py, trainers/top_k.py, batch_top_k.py, matryoshka_batch_top_k.py), written out
in float64 on the raw state-dict tensors; the library itself is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from foreign_checks import assert_same_function, write_code_executing_pickle
from torch import Tensor

from sae_fast import CheckpointError, SparseAutoencoder, formats

D, M, K, N = 7, 24, 4, 16
F64 = torch.float64
relu = torch.relu


def their_forward(name: str, sd: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x_hat, latents) of dictionary class `name` holding state dict sd, in float64."""
    sd = {
        key: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for key, v in sd.items()
    }
    if name == "AutoEncoder":
        f = relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f @ sd["decoder.weight"].T + sd["bias"], f
    if name == "AutoEncoderNew":
        f = relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f @ sd["decoder.weight"].T + sd["decoder.bias"], f
    if name in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        W_dec = sd["decoder.weight"].T
    elif name == "MatryoshkaBatchTopKSAE":
        post = relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        W_dec = sd["W_dec"]
    elif name == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False after loading
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = relu(pre * (pre > sd["threshold"]))
        return f @ sd["W_dec"] + sd["b_dec"], f
    elif name == "GatedAutoEncoder":
        x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
        f_gate = (x_enc + sd["gate_bias"] > 0).double()
        f = f_gate * relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        return f @ sd["decoder.weight"].T + sd["decoder_bias"], f
    else:
        raise AssertionError(name)
    k = int(sd["k"]) if "k" in sd else K
    if name == "AutoEncoderTopK":  # forward: encode(use_threshold=False)
        top = post.topk(k, sorted=False, dim=-1)
        f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    elif "threshold" in sd:  # BatchTopK at inference: encode(use_threshold=True)
        f = post * (post > sd["threshold"])
    else:  # versions before the threshold buffer: batch top-k in forward
        top = post.flatten().topk(k * x.shape[0], sorted=False)
        f = torch.zeros_like(post.flatten()).scatter(-1, top.indices, top.values)
        f = f.reshape(post.shape)
    return f @ W_dec + sd["b_dec"], f


def checkpoint(name: str, seed: int = 0, threshold: float | None = 0.3) -> dict:
    """A state dict of class `name` with random weights: biases nonzero, decoder norms not 1.

    threshold: BatchTopK's buffer (None: a checkpoint from before it existed).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    enc = randn(M, D, scale=D**-0.5)
    dec = randn(D, M)
    dec = dec / dec.norm(dim=0) * torch.empty(M, dtype=F64).uniform_(0.5, 2.0, generator=g)
    b_enc, b_dec = randn(M, scale=0.3), randn(D, scale=0.3)
    linear = {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    raw = {"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous()}
    buffers = {}
    if threshold is not None:
        buffers = {"k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(threshold)}
    if name == "AutoEncoder":
        return {**linear, "bias": b_dec}
    if name == "AutoEncoderNew":
        return {**linear, "decoder.bias": b_dec}
    if name in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {**linear, "b_dec": b_dec, **buffers}
    if name == "MatryoshkaBatchTopKSAE":
        return {**raw, "b_dec": b_dec, **buffers, "group_sizes": torch.tensor([8, M - 8])}
    if name == "JumpReluAutoEncoder":
        theta = torch.empty(M, dtype=F64).uniform_(0.0, 1.0, generator=g)
        theta[:2] = torch.tensor([0.0, -1.5])  # thresholds <= 0: their relu makes them 0
        return {**raw, "b_dec": b_dec, "threshold": theta}
    if name == "GatedAutoEncoder":
        gated = {"gate_bias": b_enc, "r_mag": randn(M, scale=0.5), "mag_bias": randn(M, scale=0.3)}
        return {"encoder.weight": enc, "decoder.weight": dec, "decoder_bias": b_dec, **gated}
    raise AssertionError(name)


def write(folder: Path, name: str, sd: dict, **trainer) -> Path:
    """folder/ae.pt and folder/config.json as dictionary_learning's trainSAE writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ae.pt")
    cfg = {"dict_class": name, "activation_dim": D, "dict_size": M, "lm_name": "toy", **trainer}
    body = {"trainer": cfg, "buffer": {"d_submodule": D, "io": "out"}}
    (folder / "config.json").write_text(json.dumps(body))
    return folder


def inputs(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=F64) * 1.5 + 0.2


ACTIVATION = {
    "AutoEncoder": "relu",
    "AutoEncoderNew": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "GatedAutoEncoder": "gated",
}
CASES = [
    ("AutoEncoder", 0.3),
    ("AutoEncoderNew", 0.3),
    ("AutoEncoderTopK", 0.3),  # a calibrated threshold their TopK forward ignores
    ("BatchTopKSAE", 0.3),
    ("BatchTopKSAE", -1.0),  # never calibrated: their forward keeps every positive latent
    ("BatchTopKSAE", None),  # before the threshold buffer: batch top-k
    ("MatryoshkaBatchTopKSAE", 0.3),
    ("JumpReluAutoEncoder", 0.3),
    ("GatedAutoEncoder", 0.3),
]


@pytest.mark.parametrize(("name", "threshold"), CASES)
def test_each_class_computes_the_library_forward(tmp_path, name, threshold):
    sd = checkpoint(name, threshold=threshold)
    folder = write(tmp_path / "sae", name, sd, k=K)
    assert formats.detect(folder) == "dictionary_learning"
    sae = SparseAutoencoder.load(folder)
    assert (sae.activation, sae.W_enc.dtype, sae.training) == (ACTIVATION[name], F64, False)
    latents = assert_same_function(sae, lambda x: their_forward(name, sd, x), inputs())
    active = latents > 0
    assert active.any() and not active.all()  # the activation really selects
    if name == "BatchTopKSAE" and threshold is None:
        assert int(active.sum()) == N * K
    if name == "JumpReluAutoEncoder":  # some latents are positive yet below their threshold
        pre = inputs() @ sd["W_enc"] + sd["b_enc"]
        assert ((pre > 0) & ~active).any()
        assert torch.equal(active[:, :2], pre[:, :2] > 0)  # thresholds 0 and -1.5 act as 0
        assert ((pre[:, 1] > 0) & (pre[:, 1] < 1.5)).any()


SAVED_AS = [n for n in ACTIVATION if n != "AutoEncoderNew"]


@pytest.mark.parametrize("name", SAVED_AS)
def test_save_writes_the_library_layout_and_round_trips(tmp_path, name):
    sd = checkpoint(name)
    sae = SparseAutoencoder.load(write(tmp_path / "in", name, sd, k=K))
    sae.save(tmp_path / "out", format="dictionary_learning")

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["trainer"]
    assert (cfg["dict_class"], cfg["activation_dim"], cfg["dict_size"]) == (name, D, M)
    saved = torch.load(tmp_path / "out" / "ae.pt", weights_only=True)
    assert set(saved) == set(sd)  # what their load_state_dict(strict=True) wants
    for key, value in saved.items():
        assert value.shape == sd[key].shape, key
    exact = set(sd)
    if name == "JumpReluAutoEncoder":  # b_dec is unfolded from b_enc; thresholds <= 0 are 0
        exact -= {"b_enc", "threshold"}
        torch.testing.assert_close(saved["b_enc"], sd["b_enc"])
        torch.testing.assert_close(saved["threshold"], sd["threshold"].clamp_min(0))
    if name == "AutoEncoderTopK":  # their forward never reads it; saved at their default
        exact.remove("threshold")
        assert saved["threshold"] == -1
    for key in exact:  # everything else is stored bit for bit
        assert torch.equal(saved[key].to(sd[key].dtype), sd[key]), key
    x = inputs(seed=2)
    assert_same_function(sae, lambda x: their_forward(name, saved, x), x)
    again = SparseAutoencoder.load(tmp_path / "out")
    assert again.activation == ACTIVATION[name]
    assert_same_function(again, lambda x: their_forward(name, sd, x), x)
    if name == "MatryoshkaBatchTopKSAE":  # the groups [0, 8), [8, M) as prefix sizes
        assert sae.matryoshka == again.matryoshka == [8, M]
        assert cfg["group_fractions"] == [8 / M, (M - 8) / M]
    else:
        assert again.matryoshka is None


def test_matryoshka_groups_that_do_not_fit_are_refused(tmp_path):
    for sizes, words in (([8, 8], "sum to dict_size=24"), ([0, M], "positive")):
        sd = {**checkpoint("MatryoshkaBatchTopKSAE"), "group_sizes": torch.tensor(sizes)}
        with pytest.raises(CheckpointError, match=words):
            SparseAutoencoder.load(write(tmp_path / str(sizes), "MatryoshkaBatchTopKSAE", sd, k=K))
    nested = SparseAutoencoder(D, M, k=K, matryoshka=[8, M])  # TopK: no such class there
    with pytest.raises(CheckpointError, match="Matryoshka dictionary is BatchTopK"):
        nested.save(tmp_path / "topk", format="dictionary_learning")


def test_float32_checkpoint_loads_in_float32(tmp_path):
    sd = {
        key: v.float() if v.is_floating_point() else v
        for key, v in checkpoint("AutoEncoderTopK").items()
    }
    sae = SparseAutoencoder.load(write(tmp_path, "AutoEncoderTopK", sd))
    assert sae.W_enc.dtype == torch.float32
    assert_same_function(sae, lambda x: their_forward("AutoEncoderTopK", sd, x), inputs(), 1e-4)


def test_weights_file_paths_and_detection(tmp_path):
    sd = checkpoint("GatedAutoEncoder")
    folder = write(tmp_path / "run", "GatedAutoEncoder", sd)
    # trainSAE's intermediate checkpoints sit in checkpoints/ below config.json
    (folder / "checkpoints").mkdir()
    torch.save(sd, folder / "checkpoints" / "ae_100.pt")
    x = inputs()
    for path in (folder / "ae.pt", folder / "checkpoints" / "ae_100.pt"):
        assert formats.detect(path) == "dictionary_learning"
        sae = SparseAutoencoder.load(path)
        assert_same_function(sae, lambda x: their_forward("GatedAutoEncoder", sd, x), x)
    native = tmp_path / "native"
    sae.save(native)
    assert formats.detect(native) == "sae_fast"
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint sae_fast reads"):
        formats.detect(tmp_path / "notes.txt")


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    folder = write(tmp_path / "sae", "AutoEncoder", checkpoint("AutoEncoder"))
    marker = tmp_path / "code_ran"
    write_code_executing_pickle(folder / "ae.pt", marker)
    with pytest.raises(CheckpointError, match=r"ae.pt was refused: .*could run code.*GLOBAL"):
        SparseAutoencoder.load(folder)
    with pytest.raises(CheckpointError, match="refused"):
        SparseAutoencoder.load(folder / "ae.pt", format="dictionary_learning")
    assert not marker.exists()
    # The payload is live: an unsafe load (never done by sae_fast) would have run it.
    torch.load(folder / "ae.pt", weights_only=False)
    assert marker.is_dir()


def _rewrite(folder: Path, **changes) -> None:
    body = json.loads((folder / "config.json").read_text())
    body["trainer"].update(changes)
    (folder / "config.json").write_text(json.dumps(body))


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    def folder(name: str = "AutoEncoderTopK", sd: dict | None = None, **trainer) -> Path:
        path = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        return write(path, name, checkpoint(name) if sd is None else sd, **trainer)

    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save(checkpoint("AutoEncoder"), lone / "ae.pt")
    with pytest.raises(CheckpointError, match="has no config.json beside it"):
        SparseAutoencoder.load(lone)

    cases = {
        "dict_class 'CrossCoder' is not one sae_fast reads": folder("CrossCoder", {}),
        r"holds \['b_dec', 'k', 'threshold'\], which AutoEncoder does not have": folder(
            "AutoEncoder", checkpoint("AutoEncoderTopK")
        ),
        r"'encoder.weight' has shape \(24, 7\), expected \(25, 7\)": folder(dict_size=M + 1),
        "k is neither in the state dict nor in config.json": folder(
            "BatchTopKSAE", checkpoint("BatchTopKSAE", threshold=None)
        ),
        "does not describe an SAE sae_fast runs: k must satisfy": folder(
            sd={**checkpoint("AutoEncoderTopK"), "k": torch.tensor(M + 1)}
        ),
        "holds a list, not a state dict": folder(sd=[torch.zeros(1)]),
    }
    bad_decoder = folder()
    narrow = {**checkpoint("AutoEncoderTopK"), "decoder.weight": torch.zeros(D, M - 1)}
    torch.save(narrow, bad_decoder / "ae.pt")
    cases[r"'decoder.weight' has shape \(7, 23\), expected \(7, 24\)"] = bad_decoder
    truncated = folder()
    (truncated / "ae.pt").write_bytes((truncated / "ae.pt").read_bytes()[:200])
    cases["is not a readable torch file"] = truncated
    not_json = folder()
    (not_json / "config.json").write_text("{trainer")
    cases["config.json is not valid JSON"] = not_json
    no_class = folder()
    (no_class / "config.json").write_text(json.dumps({"buffer": {}}))
    cases["has no trainer.dict_class"] = no_class
    for message, path in cases.items():
        with pytest.raises(CheckpointError, match=message):
            SparseAutoencoder.load(path)


def test_save_refuses_what_the_layout_cannot_hold(tmp_path):
    uncalibrated = SparseAutoencoder(D, M, k=K, activation="batchtopk")
    with pytest.raises(CheckpointError, match="no calibrated threshold"):
        uncalibrated.save(tmp_path / "a", format="dictionary_learning")
    normed = SparseAutoencoder(D, M, activation="relu", input_norm="layer_norm")
    with pytest.raises(CheckpointError, match="no input normalisation"):
        normed.save(tmp_path / "b", format="dictionary_learning")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
