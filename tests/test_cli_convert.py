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
