"""Training cross-layer transcoders: a CLT recovers a known cross-layer map, a stopped and
resumed run equals a straight one, every activation trains and exports for raw activations,
and `sae-fast train --clt` runs on a real model's MLPs (a tiny BERT) through eval,
dashboard and layers, with clear refusals of bad options."""

from __future__ import annotations

import json

import pytest
import torch
from model_folders import save_bert, write_corpus

from sae_fast.analysis.clt_eval import clt_activations, clt_metrics
from sae_fast.cli import main
from sae_fast.clt import CrossLayerTranscoder
from sae_fast.options import CLT_ACTIVATIONS
from sae_fast.sources import SyntheticCLTSource, build_source, documents
from sae_fast.training import CLTTrainer, TrainConfig
from sae_fast.training.checkpoints import SAE_DIR, list_checkpoints
from sae_fast.training.metrics import read_jsonl

# Three layers of 16 wide, 16 true features per layer (2 active per token); a flat lr so a
# resumed run with more steps follows a straight run's schedule.
BASE = dict(
    source="synthetic", clt=True, layers="0-2", synthetic_d=16, synthetic_features=16,
    synthetic_active=2, synthetic_noise=0.01, n_latents=32, k=2, batch_size=128,
    init_tokens=256, lr=4e-3, lr_warmup_steps=0, lr_decay="none", dead_tokens=1000,
    log_every=1, checkpoint_every=0, plots=False, progress=False, device="cpu", seed=0,
)  # fmt: skip


def trainer(tmp_path, resume=False, **options) -> CLTTrainer:
    cfg = TrainConfig(**{**BASE, "out_dir": str(tmp_path / "run"), **options})
    return CLTTrainer(cfg, build_source(cfg, "cpu"), resume)


def test_a_clt_recovers_a_known_cross_layer_map(tmp_path):
    """Every layer-0 feature's decoders to layers 0, 1 and 2 are found as one feature's; those
    that write to layers 0 and 2 and not to 1 are learned with (almost) no decoder to 1."""
    result = trainer(tmp_path, steps=600, log_every=100).train()
    source = SyntheticCLTSource(3, 16, 16, 2, 0.01, seed=0)
    true = source.true_decoders[0]  # (features, 3, d): zero where a feature does not write
    learned = result.sae.W_dec[0].detach()
    cos = (
        torch.nn.functional.normalize(true.flatten(1), dim=1)
        @ torch.nn.functional.normalize(learned.flatten(1), dim=1).T
    )
    best = cos.max(dim=1)
    assert best.values.min() > 0.95, best.values
    skips = (true[:, 0].norm(dim=-1) > 0) & (true[:, 1].norm(dim=-1) == 0)
    skips &= true[:, 2].norm(dim=-1) > 0
    assert skips.sum() >= 2  # the seed's map has such features
    for f in skips.nonzero().flatten().tolist():
        norms = learned[best.indices[f]].norm(dim=-1)  # to layers 0, 1, 2
        assert norms[1] < 0.1 * min(norms[0], norms[2]), norms
    # The exported CLT works on raw activations: its FVU on held-out rows is the training one.
    held = SyntheticCLTSource(3, 16, 16, 2, 0.01, seed=0, stream_seed=7).next_batch(2048)
    x, y = held[:, :48].reshape(-1, 3, 16).transpose(0, 1), held[:, 48:].reshape(-1, 3, 16)
    metrics = clt_metrics(result.sae, x.contiguous(), y.transpose(0, 1).contiguous())
    assert max(metrics["fvu"]) < 0.1
    assert metrics["l0"] == [2.0, 2.0, 2.0]


def test_a_stopped_and_resumed_run_equals_a_straight_one(tmp_path):
    straight = trainer(tmp_path / "a", steps=8, checkpoint_every=4, auxk_coef=0.5, dead_tokens=256)
    want = straight.train()
    first = trainer(tmp_path / "b", steps=8, checkpoint_every=4, auxk_coef=0.5, dead_tokens=256)
    first.train(until=4)
    assert [p.name for p in list_checkpoints(tmp_path / "b/run/checkpoints")] == ["step-00000004"]
    resumed = trainer(tmp_path / "b", resume=True, steps=8, checkpoint_every=4, auxk_coef=0.5,
                      dead_tokens=256)  # fmt: skip
    assert resumed.step == 4
    got = resumed.train()
    for name, t in want.sae.state_dict().items():
        assert torch.equal(got.sae.state_dict()[name], t), name
    rows = [read_jsonl(tmp_path / f"{r}/run/metrics.jsonl") for r in "ab"]
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[1]] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows[0]
    ]
    assert any(r.get("auxk", 0) > 0 for r in rows[0])  # AuxK acted on dead features
    assert {"fvu/0", "fvu/1", "fvu/2", "l0/2", "mse/1"} <= set(rows[0][-1])


@pytest.mark.parametrize("activation", CLT_ACTIVATIONS)
def test_every_activation_trains_and_exports_for_raw_activations(tmp_path, activation):
    """The saved CLT on raw rows gives the prediction the trained one gives on scaled rows."""
    run = trainer(tmp_path, steps=20, activation=activation, skip_connection=True)
    result = run.train()
    saved = CrossLayerTranscoder.load(tmp_path / "run" / SAE_DIR)
    assert saved.activation == activation and saved.skip_connection
    assert saved.provenance["step"] == 20
    rows = build_source(run.cfg, "cpu", held_out=True).next_batch(64)
    x, _ = run._inputs(rows)
    raw_x = rows[:, :48].reshape(64, 3, 16).transpose(0, 1).contiguous()
    run.sae.eval()
    if activation == "batchtopk":  # the exported thresholds against the trained CLT's
        run.sae.threshold.copy_(saved.threshold)
        assert (saved.threshold > 0).all()
    scaled = run.sae(x).y_hat.detach() / torch.tensor(run.output_scale)[:, None, None]
    torch.testing.assert_close(saved(raw_x).y_hat.detach(), scaled, atol=1e-4, rtol=1e-4)
    assert result.final["fvu"] < 1


def test_options_a_clt_run_refuses(tmp_path):
    for options, message in [
        (dict(layers=None), "clt needs layers"),
        (dict(layers="2-0"), "runs backwards"),
        (dict(layers="a-b"), "layers: expected A-B"),
        (dict(activation="gated"), "clt: activation must be one of"),
        (dict(matryoshka="8,32"), "no Matryoshka"),
        (dict(source="cache", cache_dir="x"), "not a cache"),
        (dict(clt=False), "layers are a cross-layer transcoder's"),
        (dict(source="model", model="m", hook="resid_post.0"), "give layers, not hooks"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{**BASE, **options})
    with pytest.raises(ValueError, match=r"k=40 is larger than the dictionary"):
        trainer(tmp_path, steps=1, k=40)


def test_cli_trains_a_clt_on_a_models_mlps_then_evaluates_and_converts_it(tmp_path, capsys):
    model = save_bert(tmp_path / "bert")
    text = write_corpus(tmp_path / "text.txt")
    run = tmp_path / "run"
    args = ["train", "--model", model, "--clt", "--layers", "0-1", "--text", text,
            "--n-latents", "64", "--k", "4", "--batch-size", "64", "--init-tokens", "128",
            "--steps", "30", "--lr", "1e-2", "--context-size", "32", "--shuffle-buffer", "256",
            "--log-every", "10", "--checkpoint-every", "15", "--device", "cpu",
            "--no-progress", "--no-plots", "--out-dir", str(run)]  # fmt: skip
    assert main([*args, "--steps", "15"]) == 0
    assert "saved the CLT to" in capsys.readouterr().out
    assert main(["train", "--resume", "--out-dir", str(run), "--steps", "30"]) == 0
    assert "resuming" in capsys.readouterr().out
    clt = CrossLayerTranscoder.load(run / SAE_DIR)
    assert clt.provenance["hooks_in"] == ["mlp_in.0", "mlp_in.1"]
    assert clt.provenance["hooks_out"] == ["mlp_out.0", "mlp_out.1"]
    assert clt.provenance["step"] == 30 and clt.provenance["model"] == model
    config = json.loads((run / "config.json").read_text())
    assert config["layers"] == [0, 1] and len(config["output_scale"]) == 2
    x, y = clt_activations(clt, documents(text), 400)
    assert all(0 < fvu < 1 for fvu in clt_metrics(clt, x, y)["fvu"])
    out = tmp_path / "eval.json"
    assert main(["eval", "--sae", str(run / SAE_DIR), "--text", text, "--tokens", "200",
                 "--out", str(out)]) == 0  # fmt: skip
    assert len(json.loads(out.read_text())["fvu"]) == 2
    capsys.readouterr()
    bad = ["train", *args[1:3], "--clt", "--text", text, "--out-dir", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "clt needs layers" in capsys.readouterr().err
    assert main([*bad, "--layers", "0-5"]) == 2  # the tiny BERT has two layers
    assert "layers 0-5: hook point 'mlp_in.2' is not in" in capsys.readouterr().err
    # layers: a row per layer, from training and held out.
    assert main(["layers", str(run)]) == 0
    table = json.loads((run / "layers.json").read_text())
    assert [r["hook"] for r in table["rows"]] == ["layer 0", "layer 1"]
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert table["rows"][1]["fvu"] == last["fvu/1"] and table["rows"][0]["l0"] == 4.0
    assert main(["layers", str(run), "--text", text, "--tokens", "200", "--device", "cpu"]) == 0
    held = json.loads((run / "layers.json").read_text())["rows"]
    assert [r["tokens"] for r in held] == [200, 200] and "dead_fraction" in held[1]
    assert "Cross-layer transcoder" in (run / "layers.html").read_text()
    capsys.readouterr()


def test_a_clt_layers_dashboard_shows_each_features_decoder_norm_per_target(tmp_path, capsys):
    model = save_bert(tmp_path / "bert")
    text = write_corpus(tmp_path / "text.txt")
    clt = CrossLayerTranscoder(2, 32, 24, k=3)
    clt.provenance = {"model": model, "hooks_in": ["mlp_in.0", "mlp_in.1"],
                      "hooks_out": ["mlp_out.0", "mlp_out.1"]}  # fmt: skip
    clt.save(tmp_path / "clt")
    # The layer's transcoder codes as the CLT does on that layer.
    x, _ = clt_activations(clt, documents(text), 100)
    view = clt.layer_transcoder(0)
    assert view.transcoder and view.provenance["hook_in"] == "mlp_in.0"
    code, want = view.encode(x[0]), clt.encode(x)
    assert torch.equal(code.indices, want.indices[0]) and torch.equal(code.values, want.values[0])
    out = tmp_path / "board"
    args = ["dashboard", "--sae", str(tmp_path / "clt"), "--text", text, "--out", str(out),
            "--tokens", "300", "--features", "0-5", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*args, "--layer", "0"]) == 0
    record = json.loads((out / "features" / "2.json").read_text())
    norms = clt.W_dec[0][2].detach().norm(dim=-1).tolist()
    assert [(w["target"], w["hook"]) for w in record["decoder_norms"]] == [
        (0, "mlp_out.0"), (1, "mlp_out.1"),
    ]  # fmt: skip
    assert [w["norm"] for w in record["decoder_norms"]] == pytest.approx(norms, rel=1e-4)
    page = (out / "features" / "2.html").read_text()
    assert "Decoder norm per target layer" in page and "mlp_out.1" in page
    assert record["hook"] == "mlp_in.0"
    capsys.readouterr()
    assert main(args) == 2
    assert "give --layer 0..1" in capsys.readouterr().err
    assert main([*args, "--layer", "2"]) == 2
