"""`sae-fast convert` and `sae-fast inspect`."""

from __future__ import annotations

import json

import pytest
import torch

from sae_fast import SparseAutoencoder, formats
from sae_fast.cli import main


def make_saved(folder, input_norm: str = "none"):
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 24, k=3, input_norm=input_norm)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_dec.mul_(2.0)
    sae.save(folder)
    return sae, folder


@pytest.fixture
def saved(tmp_path):
    return make_saved(tmp_path / "src")


def test_inspect_prints_format_shapes_and_norms(saved, capsys):
    sae, path = saved
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "sae_fast" and info["activation"] == "topk" and info["k"] == 3
    assert info["parameters"]["W_enc"] == [24, 8] and info["dtype"] == "float32"
    assert info["decoder_row_norm"]["mean"] == pytest.approx(2.0, rel=1e-5)
    assert info["b_enc"]["max"] == pytest.approx(sae.b_enc.max().item())


@pytest.mark.parametrize("fmt", formats.writable())
def test_convert_round_trips_through_every_writable_format(tmp_path, fmt):
    # openai's TopK autoencoders always LayerNorm their input.
    sae, path = make_saved(tmp_path / "src", "layer_norm" if fmt == "openai" else "none")
    assert main(["convert", str(path), str(tmp_path / fmt), "--to", fmt]) == 0
    back = tmp_path / f"{fmt}-back"
    assert main(["convert", str(tmp_path / fmt), str(back), "--to", "sae_fast"]) == 0
    x = torch.randn(16, 8)
    torch.testing.assert_close(SparseAutoencoder.load(back)(x).x_hat, sae.eval()(x).x_hat)


def test_bad_inputs_exit_2_naming_the_problem(saved, tmp_path, capsys):
    _, path = saved
    assert main(["convert", str(path), str(tmp_path / "oa"), "--to", "openai"]) == 2
    assert "input_norm 'layer_norm' only" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "onnx"]) == 2
    assert "format must be one of" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 8)
    assert main(["inspect", str(tmp_path / "junk")]) == 2
    assert "not a checkpoint sae_fast reads" in capsys.readouterr().err


def clt_of(activation: str, provenance: dict | None = None):
    from sae_fast import CrossLayerTranscoder

    torch.manual_seed(0)
    k = 4 if activation == "topk" else None
    clt = CrossLayerTranscoder(2, 32, 64, k=k, activation=activation, provenance=provenance)
    with torch.no_grad():
        clt.b_enc.uniform_(-0.1, 0.2)
    return clt.eval()


def test_convert_moves_a_clt_between_its_layouts(tmp_path, capsys):
    from sae_fast import CrossLayerTranscoder

    clt = clt_of("relu")
    clt.save(tmp_path / "ours")
    assert (
        main(["convert", str(tmp_path / "ours"), str(tmp_path / "ct"), "--to", "circuit-tracer"])
        == 0
    )
    assert (tmp_path / "ct" / "W_dec_1.safetensors").is_file()
    assert (
        main(["convert", str(tmp_path / "ct"), str(tmp_path / "lm"), "--to", "llamascopium"]) == 0
    )
    back = CrossLayerTranscoder.load(tmp_path / "lm")
    for name, t in clt.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert "wrote" in capsys.readouterr().out
    code = main(["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "saelens"])
    assert code == 2 and "format must be one of" in capsys.readouterr().err
    code = main(["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "sae_fast",
                 "--calibrate", "stdlib"])  # fmt: skip
    assert code == 2 and "--calibrate: this CLT is relu" in capsys.readouterr().err


def test_convert_calibrates_a_topk_clt_for_circuit_tracer(tmp_path, capsys):
    from model_folders import save_bert, write_corpus

    from sae_fast import CrossLayerTranscoder

    model = save_bert(tmp_path / "bert")
    text = write_corpus(tmp_path / "text.txt")
    hooks = {"hooks_in": ["mlp_in.0", "mlp_in.1"], "hooks_out": ["mlp_out.0", "mlp_out.1"]}
    clt_of("topk", {"model": model, **hooks}).save(tmp_path / "topk")
    args = ["convert", str(tmp_path / "topk"), str(tmp_path / "ct"), "--to", "circuit-tracer"]
    assert main(args) == 2
    assert "--calibrate: circuit-tracer holds no topk CLT" in capsys.readouterr().err
    assert main([*args, "--calibrate", text, "--calibrate-tokens", "400"]) == 0
    out = capsys.readouterr().out
    assert "topk FVU per target layer:" in out and "jumprelu FVU per target layer:" in out
    back = CrossLayerTranscoder.load(tmp_path / "ct")
    assert back.activation == "jumprelu" and torch.isfinite(back.log_threshold).all()
    clt_of("topk").save(tmp_path / "bare")
    bare = ["convert", str(tmp_path / "bare"), str(tmp_path / "ct2"), "--to", "circuit-tracer"]
    assert main([*bare, "--calibrate", text]) == 2
    assert "does not record its model" in capsys.readouterr().err


def test_convert_keeps_sae_and_clt_apart(tmp_path, capsys):
    from sae_fast import CrossLayerTranscoder

    make_saved(tmp_path / "sae")
    args = ["convert", str(tmp_path / "sae"), str(tmp_path / "out"), "--to", "saelens"]
    assert main([*args, "--from", "sae_fast"]) == 0  # sae_fast names an SAE and a CLT layout
    assert SparseAutoencoder.load(tmp_path / "out").d_in > 0
    assert main([*args, "--calibrate", "stdlib"]) == 2
    assert "--calibrate: only for a TopK cross-layer transcoder" in capsys.readouterr().err
    clt_of("relu").save(tmp_path / "clt", format="llamascopium")
    dst = str(tmp_path / "back")
    assert main(["convert", str(tmp_path / "clt"), dst, "--to", "sae_fast"]) == 0
    assert CrossLayerTranscoder.load(dst).activation == "relu"
