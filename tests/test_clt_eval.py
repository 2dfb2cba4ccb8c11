"""A cross-layer transcoder's held-out metrics: streamed over batches, each target layer's own,
against the one-batch definitions; and `sae-fast eval` on a CLT trained on a real model's
activations (a tiny BERT's MLP inputs and outputs)."""

from __future__ import annotations

import json

import pytest
import torch
from model_folders import save_bert, write_corpus
from test_clt import L, integer_clt

from sae_fast import reference
from sae_fast.analysis.clt_eval import clt_activations, clt_metrics
from sae_fast.cli import main
from sae_fast.clt import CrossLayerTranscoder
from sae_fast.sources import SourceError, documents


def test_metrics_are_each_target_layers_own_and_stream_over_batches():
    clt, x = integer_clt("topk")
    clt.eval()
    y = clt(x).y_hat.detach() + 0.5 * torch.randn(L, x.shape[1], clt.d_out, dtype=torch.float64)
    y[1] = clt(x).y_hat[1].detach()  # layer 1 predicted exactly
    whole = clt_metrics(clt, x, y)
    streamed = clt_metrics(clt, x, y, batch_size=4)
    for key in ("fvu", "mse", "l0", "dead_fraction"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    assert whole["fvu"][1] == 0 and min(whole["fvu"][0], whole["fvu"][2]) > 0
    out = clt(x)
    for t in range(L):
        want = reference.fvu(y[t], out.y_hat[t].detach()).item()
        assert whole["fvu"][t] == pytest.approx(want, rel=1e-9)
        assert whole["l0"][t] == pytest.approx((out.code.values[t] != 0).sum(-1).double().mean())
        fired = out.code.indices[t][out.code.values[t] != 0].unique().numel()
        assert whole["dead_fraction"][t] == pytest.approx(1 - fired / clt.n_latents)


@pytest.fixture(scope="module")
def bert_clt(tmp_path_factory):
    """A TopK CLT trained a few steps on a tiny BERT's two MLPs, saved with its provenance."""
    from sae_fast.training.clt_losses import CLTLossWeights, clt_training_loss

    tmp = tmp_path_factory.mktemp("bert_clt")
    model = save_bert(tmp / "bert")
    text = write_corpus(tmp / "text.txt")
    hooks = {"hooks_in": ["mlp_in.0", "mlp_in.1"], "hooks_out": ["mlp_out.0", "mlp_out.1"]}
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(2, 32, 64, k=4, provenance={"model": model, **hooks})
    x, y = clt_activations(clt, documents(text), 512)
    a, c = (32**0.5 / t.norm(dim=-1).mean(dim=1) for t in (x, y))  # trained at norm sqrt(d)
    x, y = x * a[:, None, None], y * c[:, None, None]
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-2)
    for _ in range(40):
        loss = clt_training_loss(clt, x, y, CLTLossWeights()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    clt.fold_scales_(a, c)
    clt.save(tmp / "clt")
    return tmp / "clt", text


def test_eval_reports_each_target_layer_of_a_clt(bert_clt, tmp_path, capsys):
    folder, text = bert_clt
    args = ["eval", "--sae", str(folder), "--text", text, "--tokens", "300", "--batch-size", "64"]
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "dead_fraction" in printed and "(300 held-out tokens)" in printed
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 300 and len(result["fvu"]) == 2
    assert all(0 < v < 1 for v in result["fvu"])  # trained: better than the mean
    assert result["l0"] == [4.0, 4.0]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_eval_of_a_clt_says_what_it_needs(bert_clt, tmp_path, capsys):
    folder, text = bert_clt
    assert main(["eval", "--sae", str(folder)]) == 2
    assert "--text: give held-out text" in capsys.readouterr().err
    assert main(["eval", "--sae", str(folder), "--text", text, "--ce"]) == 2
    assert "--ce" in capsys.readouterr().err
    bare = CrossLayerTranscoder.load(folder)
    bare.provenance = {}
    bare.save(tmp_path / "bare")
    assert main(["eval", "--sae", str(tmp_path / "bare"), "--text", text]) == 2
    assert "does not record its model" in capsys.readouterr().err
    with pytest.raises(SourceError, match="does not record"):
        clt_activations(bare, documents(text), 10)
