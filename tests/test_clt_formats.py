"""Cross-layer transcoder layouts: sae_fast's own, circuit-tracer's and llamascopium's, round
trips, the real circuit-tracer reading what we write (and we reading what it writes), the
folding of llamascopium's decoder-norm thresholds and dataset-wise normalisation, and the
refusals that say what a layout cannot hold."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from integrations import require, without_sae_fast
from safetensors.torch import save_file

from sae_fast import CheckpointError, SparseAutoencoder
from sae_fast.clt import CrossLayerTranscoder

L, D, M = 3, 8, 24

# circuit-tracer 0.5.0 reads a name huggingface-hub 1.x dropped; it is installed without its
# pins (.ci/run), and this is all it needs to import next to ours.
CIRCUIT_TRACER = (
    "import huggingface_hub.constants as c\n"
    "c.HF_HUB_ENABLE_HF_TRANSFER = False\n"
    "from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt\n"
)


def clt_of(activation: str, skip: bool = False, d_out: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    k = 3 if activation in ("topk", "batchtopk") else None
    clt = CrossLayerTranscoder(
        L, D, M, k=k, activation=activation, skip_connection=skip, d_out=d_out,
        jumprelu_init_threshold=0.2,
    )  # fmt: skip
    with torch.no_grad():
        clt.b_enc.uniform_(-0.2, 0.4)
        clt.b_dec.normal_()
        if skip:
            clt.W_skip.normal_(std=0.1)
        if activation == "jumprelu":
            clt.log_threshold.uniform_(-3, -1)
    return clt.eval()


def assert_same_tensors(a: CrossLayerTranscoder, b: CrossLayerTranscoder, threshold_ulps=0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, t in sa.items():
        if name == "log_threshold" and threshold_ulps:
            torch.testing.assert_close(sb[name], t, rtol=threshold_ulps * 1.2e-7, atol=0)
        else:
            assert torch.equal(sb[name], t), name


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_own_layout_round_trips_bit_for_bit(tmp_path, activation):
    clt = clt_of(activation, skip=True, d_out=5)
    clt.provenance = {"model": "m", "hooks_in": ["a", "b", "c"]}
    clt.save(tmp_path / "clt")
    back = CrossLayerTranscoder.load(tmp_path / "clt")
    assert_same_tensors(clt, back)
    assert back.config() == clt.config() and not back.training
    x = torch.randn(L, 6, D)
    assert torch.allclose(back(x).y_hat, clt(x).y_hat, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("layout", ["circuit-tracer", "llamascopium"])
def test_foreign_layouts_round_trip(tmp_path, activation, layout):
    clt = clt_of(activation)
    clt.save(tmp_path / "clt", format=layout)
    back = CrossLayerTranscoder.load(tmp_path / "clt")
    assert_same_tensors(clt, back, threshold_ulps=4 if activation == "jumprelu" else 0)
    mine = {k: v for k, v in back.config().items() if k != "provenance"}
    assert mine == {k: v for k, v in clt.config().items() if k != "provenance"}
    x = torch.randn(L, 6, D)
    torch.testing.assert_close(back(x).y_hat, clt(x).y_hat)


@pytest.mark.parametrize("layout", ["circuit-tracer", "llamascopium"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation": "topk"}, "to_jumprelu"),
        ({"activation": "relu", "skip": True}, "skip connection"),
        ({"activation": "relu", "d_out": 5}, "one width"),
    ],
)
def test_foreign_layouts_refuse_what_they_cannot_hold(tmp_path, layout, options, message):
    clt = clt_of(**options)
    with pytest.raises(CheckpointError, match=message):
        clt.save(tmp_path / "clt", format=layout)
    assert not (tmp_path / "clt").exists()


@pytest.mark.parametrize("layout", ["sae_fast", "circuit-tracer", "llamascopium"])
def test_an_sae_loader_says_the_folder_holds_a_clt(tmp_path, layout):
    clt_of("relu").save(tmp_path / "clt", format=layout)
    with pytest.raises(CheckpointError, match="cross-layer transcoder.*CrossLayerTranscoder.load"):
        SparseAutoencoder.load(tmp_path / "clt")
    SparseAutoencoder(D, M, k=3).save(tmp_path / "sae")
    with pytest.raises(CheckpointError, match="an SAE.*SparseAutoencoder.load"):
        CrossLayerTranscoder.load(tmp_path / "sae")


def test_circuit_tracer_files_and_config(tmp_path):
    clt = clt_of("jumprelu")
    hooks_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
    clt.provenance = {"model": "gpt2", "hooks_in": hooks_in}
    clt.save(tmp_path / "clt", format="circuit-tracer")
    names = sorted(p.name for p in (tmp_path / "clt").iterdir() if not p.name.startswith("."))
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors",
                     "W_enc_0.safetensors", "W_enc_1.safetensors", "W_enc_2.safetensors",
                     "config.yaml"]  # fmt: skip
    text = (tmp_path / "clt" / "config.yaml").read_text()
    want = [
        "model_kind: cross_layer_transcoder",
        "model_name: gpt2",
        "feature_input_hook: ln2.hook_normalized",
        "feature_output_hook: hook_mlp_out",
    ]
    assert set(want) <= set(text.splitlines())
    back = CrossLayerTranscoder.load(tmp_path / "clt")
    assert back.provenance == {
        "model": "gpt2",
        "hooks_in": hooks_in,
        "hooks_out": [f"blocks.{i}.hook_mlp_out" for i in range(L)],
    }
    clt.provenance = {"hooks_in": ["mlp_in.0", "mlp_in.1", "mlp_in.2"]}  # not TL's names
    clt.save(tmp_path / "ours", format="circuit-tracer")
    assert "feature_input_hook: hook_resid_mid" in (tmp_path / "ours" / "config.yaml").read_text()


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_real_circuit_tracer_reads_our_export(tmp_path, activation):
    require("circuit_tracer", load=False)
    clt = clt_of(activation)
    clt.save(tmp_path / "clt", format="circuit-tracer")
    x = torch.randn(L, 9, D)
    code = CIRCUIT_TRACER + (
        f"clt = load_clt({str(tmp_path / 'clt')!r}, device=torch.device('cpu'),"
        " dtype=torch.float32)\n"
        "assert clt.n_layers == 3 and clt.d_transcoder == 24\n"
        "y = clt(x)\n"
    )
    theirs, _ = without_sae_fast(code, x, tmp_path)
    torch.testing.assert_close(theirs, clt(x).y_hat.detach(), rtol=1e-5, atol=1e-5)


def test_we_read_what_real_circuit_tracer_writes(tmp_path):
    require("circuit_tracer", load=False)
    x = torch.randn(L, 9, D)
    code = CIRCUIT_TRACER + (
        "torch.manual_seed(0)\n"
        "clt = CrossLayerTranscoder(3, 24, 8, activation_function='jump_relu',"
        " lazy_decoder=False, device=torch.device('cpu'), dtype=torch.float32)\n"
        "with torch.no_grad():\n"
        "    for p in clt.parameters():\n"
        "        p.normal_(std=0.3)\n"
        "    clt.activation_function.threshold.uniform_(0.05, 0.3)\n"
        f"clt.to_safetensors({str(tmp_path / 'ct')!r})\n"
        "y = clt(x)\n"
    )
    theirs, _ = without_sae_fast(code, x, tmp_path)
    ours = CrossLayerTranscoder.load(tmp_path / "ct")
    assert ours.activation == "jumprelu" and ours.n_latents == 24
    torch.testing.assert_close(ours(x).y_hat.detach(), theirs, rtol=1e-5, atol=1e-5)


def llamascopium_folder(tmp_path, include_decoder_norm: bool, dataset_norms: bool):
    """A llamascopium CLT written from its layout, and its forward computed by its definition:
    x scaled by sqrt(d) / norm, pre = x W_E + b_E, JumpReLU on pre * decoder norm (when
    included), y = sum of codes @ W_D + b_D, scaled back by the output's norm."""
    g = torch.Generator().manual_seed(3)
    W_E = torch.randn(L, D, M, generator=g) / 3
    b_E = torch.randn(L, M, generator=g) / 5
    W_D = [torch.randn(t + 1, M, D, generator=g) / 3 for t in range(L)]
    b_D = [torch.randn(D, generator=g) for _ in range(L)]
    log_t = torch.empty(L, M).uniform_(-2.5, -1, generator=g)
    hooks_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
    hooks_out = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    weights = {"W_E": W_E, "b_E": b_E, "activation_function.log_jumprelu_threshold": log_t}
    weights.update({f"W_D.{t}": W_D[t] for t in range(L)})
    weights.update({f"b_D.{t}": b_D[t] for t in range(L)})
    norms = {h: torch.tensor(1.0 + 0.5 * i) for i, h in enumerate(hooks_in + hooks_out)}
    if dataset_norms:
        weights.update({f"dataset_average_activation_norm.{h}": v for h, v in norms.items()})
    folder = tmp_path / "lm"
    folder.mkdir()
    save_file(weights, folder / "sae_weights.safetensors")
    config = {
        "sae_type": "clt", "d_model": D, "expansion_factor": M / D, "act_fn": "jumprelu",
        "top_k": 50, "use_decoder_bias": True, "hook_points_in": hooks_in,
        "hook_points_out": hooks_out, "sparsity_include_decoder_norm": include_decoder_norm,
        "norm_activation": "dataset-wise" if dataset_norms else "inference",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))

    def forward(x):
        scale_in = [math.sqrt(D) / norms[h] if dataset_norms else 1.0 for h in hooks_in]
        scale_out = [math.sqrt(D) / norms[h] if dataset_norms else 1.0 for h in hooks_out]
        dec_norm = torch.stack(
            [sum(W_D[t][s].pow(2).sum(-1) for t in range(s, L)) for s in range(L)]
        ).sqrt()
        codes = []
        for i in range(L):
            pre = (x[i] * scale_in[i]) @ W_E[i] + b_E[i]
            key = pre * dec_norm[i] if include_decoder_norm else pre
            codes.append(pre * (key > log_t[i].exp()))
        return torch.stack(
            [(sum(codes[s] @ W_D[t][s] for s in range(t + 1)) + b_D[t]) / scale_out[t]
             for t in range(L)]
        )  # fmt: skip

    return folder, forward


@pytest.mark.parametrize("include_decoder_norm", [False, True])
@pytest.mark.parametrize("dataset_norms", [False, True])
def test_llamascopium_folds_decoder_norms_and_normalisation(
    tmp_path, include_decoder_norm, dataset_norms
):
    folder, forward = llamascopium_folder(tmp_path, include_decoder_norm, dataset_norms)
    ours = CrossLayerTranscoder.load(folder)
    assert ours.provenance["hooks_in"][0] == "blocks.0.ln2.hook_normalized"
    x = torch.randn(L, 40, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours(x).y_hat.detach(), forward(x), rtol=1e-5, atol=1e-5)
    ours.save(tmp_path / "again", format="llamascopium")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["norm_activation"] == "inference"
    assert config["sparsity_include_decoder_norm"] is False
    again = CrossLayerTranscoder.load(tmp_path / "again")
    torch.testing.assert_close(again(x).y_hat.detach(), forward(x), rtol=1e-5, atol=1e-5)


def test_llamascopium_refusals(tmp_path):
    folder, _ = llamascopium_folder(tmp_path, False, False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "act_fn": "topk"}))
    with pytest.raises(CheckpointError, match="act_fn 'topk'"):
        CrossLayerTranscoder.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "norm_activation": "token-wise"}))
    with pytest.raises(CheckpointError, match="token-wise"):
        CrossLayerTranscoder.load(folder)
    clt = CrossLayerTranscoder(L, 7, 61, activation="relu")  # int(7 * (61 / 7)) = 60
    with pytest.raises(CheckpointError, match="expansion_factor"):
        clt.save(tmp_path / "bad", format="llamascopium")


def test_real_circuit_tracer_attributes_through_a_clt_we_trained():
    """circuit_tracer_checks.py, in a Python of its own: circuit-tracer's ReplacementModel on
    a tiny random model with a CLT sae_fast trained and saved, its attribution graph against
    sae_fast's activations, hand formulas and a frozen-model recomputation of every edge."""
    require("circuit_tracer", load=False)
    script = Path(__file__).with_name("circuit_tracer_checks.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("PASS") for line in lines) == 28, done.stdout[-4000:]
    assert "OVERALL: PASS" in lines
