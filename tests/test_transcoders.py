"""Transcoders: the module against the dense float64 reference (forward and every gradient,
skip connection included), the scale fold, training that learns a known linear-plus-sparse
map, exact resume on a real model, splicing into the output hook, and the command line."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch
from model_folders import save_model, write_corpus
from models import tiny_bert, tiny_causal_lm
from test_sources_model import corpus
from test_trainer import assert_same_run, metric_rows

from sae_fast import CheckpointError, SparseAutoencoder, reference
from sae_fast.analysis.steering import attach
from sae_fast.cli import main
from sae_fast.sources import ModelSource, capture
from sae_fast.training import ConfigError, TrainConfig, Trainer
from sae_fast.training.config import REFUSE

D_IN, D_OUT, M, K = 7, 11, 37, 4  # widths that tile nothing


def transcoder(activation: str, skip: bool, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    k = K if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(
        D_IN, M, k=k, activation=activation, transcoder=True, d_out=D_OUT,
        skip_connection=skip, dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.3)
        sae.b_dec.normal_()
        if skip:
            sae.W_skip.normal_(std=0.3)
        if activation == "jumprelu":
            sae.log_threshold.copy_(torch.empty(M).uniform_(0.05, 0.4).log())
    return sae.train()


def reference_output(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's prediction computed densely: no b_dec on the input."""
    pre = x @ sae.W_enc.T + sae.b_enc
    if sae.activation == "topk":
        z = reference.sparse_to_dense(*reference.topk(pre, K), M)
    elif sae.activation == "batchtopk":
        z = reference.batchtopk(pre, K)
    elif sae.activation == "relu":
        z = reference.relu(pre)
    else:
        z = reference.jumprelu(pre, sae.log_threshold.exp(), sae.jumprelu_bandwidth)
    y = reference.decode_dense(z, sae.W_dec, sae.b_dec)
    return y + x @ sae.W_skip.T if sae.skip_connection else y


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_forward_and_every_gradient_equal_the_dense_reference(activation, skip):
    sae = transcoder(activation, skip)
    x = torch.randn(13, D_IN, dtype=torch.float64)
    x[3] = -5.0  # a row whose pre-activations are all negative for most latents
    target = torch.randn(13, D_OUT, dtype=torch.float64)
    ours = copy.deepcopy(sae)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)
    assert out.x_hat.shape == (13, D_OUT)
    want = reference_output(sae, x_ref)
    torch.testing.assert_close(out.x_hat, want)
    reference.mse(target, out.x_hat).backward()
    reference.mse(target, want).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for (name, p), q in zip(ours.named_parameters(), sae.parameters(), strict=True):
        if q.grad is None:  # only jumprelu's threshold: its gradient is the L0 term's
            assert p.grad is None or name == "log_threshold", name
            continue
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert ours.b_dec.grad is not None and ours.b_dec.grad.shape == (D_OUT,)


def test_the_scale_fold_maps_raw_input_to_raw_output():
    sae = transcoder("topk", skip=True).eval()
    s_in, s_out = 3.0, 0.25
    x = torch.randn(9, D_IN, dtype=torch.float64)
    trained = sae(x * s_in)
    folded = copy.deepcopy(sae)
    folded.fold_input_scale_(s_in, s_out)
    raw = folded(x)
    torch.testing.assert_close(raw.x_hat, trained.x_hat / s_out)
    assert torch.equal(raw.code.indices, trained.code.indices)
    with pytest.raises(ValueError, match="output_scale: an SAE's output"):
        SparseAutoencoder(D_IN, M, k=K).fold_input_scale_(s_in, s_out)


def test_config_round_trip_and_checks(tmp_path):
    sae = transcoder("relu", skip=True)
    sae.save(tmp_path / "tc")
    saved = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (saved["transcoder"], saved["d_out"], saved["skip_connection"]) == (True, D_OUT, True)
    back = SparseAutoencoder.load(tmp_path / "tc")
    x = torch.randn(5, D_IN, dtype=torch.float64)
    torch.testing.assert_close(back(x).x_hat, sae.eval()(x).x_hat)
    plain = SparseAutoencoder(D_IN, M, k=K)
    plain.save(tmp_path / "plain")
    fields = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    assert not {"transcoder", "d_out", "skip_connection"} & set(fields)  # older readers
    # Layouts without transcoders refuse to hold one: it would load back as a plain SAE.
    for fmt in ("dictionary_learning", "openai"):
        with pytest.raises(
            CheckpointError, match=f"transcoder and skip_connection, which the {fmt}"
        ):
            sae.save(tmp_path / fmt, format=fmt)
    with pytest.raises(CheckpointError, match="has skip_connection, which the openai"):
        SparseAutoencoder(D_IN, M, k=K, skip_connection=True).save(tmp_path / "o", format="openai")
    other = SparseAutoencoder(D_IN, M, k=K)
    other.save(tmp_path / "other")
    assert main(["compare", str(tmp_path / "tc"), str(tmp_path / "other")]) == 2
    for kwargs, match in [
        ({"d_out": 5}, "only a transcoder's may"),
        ({"transcoder": True, "activation": "gated", "k": None}, "gated transcoder"),
        ({"transcoder": True, "input_norm": "layer_norm"}, "input_norm='layer_norm' with a"),
        ({"transcoder": "yes"}, "transcoder must be true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            SparseAutoencoder(D_IN, M, **{"k": K, **kwargs})


class LinearPlusSparse:
    """Rows (x, y) side by side: x = (z F, n), y = 2 z G + A n, with z sparse and positive
    (24 features in 16 dims, 2 active) and n dense gaussian (8 dims).

    No sparse code can carry the dense n: a transcoder needs its skip connection to predict
    y, and the skip connection's columns on n must become A. (How the sparse part splits
    between the latents and the skip connection's other columns is not pinned down: the
    test does not ask.)
    """

    SPARSE, DENSE, OUT = 16, 8, 12

    def __init__(self, seed: int = 0, features: int = 24, active: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        unit = torch.nn.functional.normalize
        self.F = unit(torch.randn(features, self.SPARSE, generator=g), dim=1)
        self.G = unit(torch.randn(features, self.OUT, generator=g), dim=1)
        self.A = 0.5 * torch.randn(self.OUT, self.DENSE, generator=g)
        self.features, self.active = features, active
        self.widths = (self.SPARSE + self.DENSE, self.OUT)
        self.d_in = sum(self.widths)
        self.g = torch.Generator().manual_seed(seed + 1)

    def next_batch(self, n: int) -> torch.Tensor:
        pick = torch.rand(n, self.features, generator=self.g).argsort(1)[:, : self.active]
        z = torch.zeros(n, self.features)
        z.scatter_(1, pick, 1 + torch.rand(n, self.active, generator=self.g))
        dense = torch.randn(n, self.DENSE, generator=self.g)
        y = z @ (2 * self.G) + dense @ self.A.T
        return torch.cat([z @ self.F, dense, y], dim=1)

    def state_dict(self) -> dict:
        return {"g": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["g"])

    def describe(self) -> dict:
        return {"kind": "linear-plus-sparse"}


def fit(tmp_path, skip: bool) -> tuple[SparseAutoencoder, float]:
    """A TopK transcoder trained on LinearPlusSparse, and its FVU on held-out rows."""
    cfg = TrainConfig(
        source="model", model="synthetic", hook_in="x", hook_out="y", skip_connection=skip,
        n_latents=64, k=2, steps=400, batch_size=256, lr=1e-2, lr_warmup_steps=20,
        init_tokens=1024, dead_tokens=2048, log_every=50, checkpoint_every=0,
        out_dir=str(tmp_path / f"skip-{skip}"), progress=False, plots=False,
    )  # fmt: skip
    trained = Trainer(cfg, LinearPlusSparse()).train().sae
    rows = LinearPlusSparse()
    rows.g.manual_seed(99)  # held-out rows of the same map
    x, y = trained.split_rows(rows.next_batch(4096))
    with torch.no_grad():
        fvu = reference.fvu(y, trained(x).x_hat).item()
    return trained, fvu


def test_a_transcoder_learns_a_known_linear_plus_sparse_map(tmp_path):
    with_skip, fvu_skip = fit(tmp_path, skip=True)
    _, fvu_plain = fit(tmp_path, skip=False)
    assert fvu_skip < 0.03 and fvu_plain > 5 * fvu_skip, (fvu_skip, fvu_plain)
    A = LinearPlusSparse().A
    learned = with_skip.W_skip.detach()[:, LinearPlusSparse.SPARSE :]  # in raw units
    assert (learned - A).norm() / A.norm() < 0.05


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_every_activation_trains_and_exports_for_raw_activations(tmp_path, activation):
    cfg = TrainConfig(
        source="model", model="synthetic", hook_in="x", hook_out="y", skip_connection=True,
        activation=activation, k=2 if activation in ("topk", "batchtopk") else 32,
        n_latents=32, steps=20, batch_size=128, lr=3e-3, init_tokens=512, dead_tokens=256,
        out_dir=str(tmp_path), progress=False, plots=False,
    )  # fmt: skip
    trainer = Trainer(cfg, LinearPlusSparse())
    result = trainer.train()
    assert all(torch.isfinite(p).all() for p in result.sae.parameters())
    assert trainer.scale != trainer.output_scale  # two widths, two scales
    x, _ = result.sae.split_rows(LinearPlusSparse().next_batch(64))
    if activation == "batchtopk":  # the threshold the export calibrates, in training units
        trainer.sae.threshold.fill_(trainer.batchtopk_threshold)
    with torch.no_grad():
        raw = result.sae.eval()(x).x_hat
        scaled = trainer.sae.eval()(x * trainer.scale).x_hat / trainer.output_scale
    torch.testing.assert_close(raw, scaled, rtol=1e-4, atol=1e-5)


HOOKS = ("resid_post.0", "encoder.layer.1.intermediate")  # widths 32 -> 64


def bert_run(tmp_path, name, **kw):
    model, tokenizer = tiny_bert()
    text = corpus(tmp_path / "c.txt", 30)
    source = ModelSource(model, tokenizer, HOOKS, text, context_size=16, batch_size=3,
                         shuffle_buffer=60, seed=1)  # fmt: skip
    cfg = TrainConfig(
        source="model", model="tiny-bert", hook_in=HOOKS[0], hook_out=HOOKS[1],
        skip_connection=True, text=text, n_latents=48, k=4, steps=8, batch_size=32,
        init_tokens=64, context_size=16, model_batch_size=3, shuffle_buffer=60, seed=1,
        dead_tokens=64, lr=3e-3, log_every=2, checkpoint_every=3,
        out_dir=str(tmp_path / name), progress=False, plots=False,
    )  # fmt: skip
    return cfg, source


def test_stop_and_resume_equals_a_straight_run(tmp_path):
    straight = Trainer(*bert_run(tmp_path, "straight"))
    result = straight.train()
    assert (result.sae.d_in, result.sae.d_out) == (32, 64)
    assert result.sae.provenance["hook_in"] == HOOKS[0]
    assert result.sae.provenance["hook_out"] == HOOKS[1]
    first = Trainer(*bert_run(tmp_path, "split"))
    first.train(until=4)
    resumed = Trainer(*bert_run(tmp_path, "split"), resume=True)
    assert resumed.step == 4 and resumed.output_scale == straight.output_scale
    resumed.train()
    assert_same_run(straight, resumed)
    assert metric_rows(straight) == metric_rows(resumed)
    assert any("auxk" in row for row in metric_rows(resumed))


def test_trainer_refusals(tmp_path):
    with pytest.raises(ConfigError, match="needs both hook_in and hook_out"):
        TrainConfig(source="model", model="m", hook_in="resid_post.0")
    with pytest.raises(ConfigError, match="replace hook"):
        TrainConfig(source="model", model="m", hook="a", hook_in="b", hook_out="c")
    with pytest.raises(ConfigError, match="hook_out must differ"):
        TrainConfig(source="model", model="m", hook_in="b", hook_out="b")
    with pytest.raises(ConfigError, match="skip_connection is a transcoder's"):
        TrainConfig(source="synthetic", skip_connection=True)


def test_splicing_replaces_the_output_hook_with_the_prediction():
    model, _ = tiny_causal_lm()
    torch.manual_seed(0)
    sae = SparseAutoencoder(32, 64, k=4, transcoder=True, d_out=32, skip_connection=True)
    with torch.no_grad():
        sae.W_skip.normal_(std=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with (
            capture(model, "mlp_in.1") as read,
            attach(model, "mlp_out.1", sae, hook_in="mlp_in.1") as site,
            capture(model, "mlp_out.1") as written,  # after the splice: what it wrote
        ):
            spliced = model(input_ids=ids).logits
        torch.testing.assert_close(written.output, sae(read.output).x_hat)
        assert site.code is not None and not torch.allclose(spliced, clean)
        # With the error added back and no edits, the model runs as it did.
        with attach(model, "mlp_out.1", sae, hook_in="mlp_in.1", add_error=True):
            assert torch.equal(model(input_ids=ids).logits, clean)
    with pytest.raises(ValueError, match="a transcoder reads hook_in"):
        attach(model, "mlp_out.1", sae).__enter__()


def test_cli_trains_evaluates_and_saves_a_transcoder(tmp_path, capsys):
    model = save_model(tmp_path / "gpt")
    text = write_corpus(tmp_path / "train.txt")
    held = write_corpus(tmp_path / "held.txt", paragraphs=20)
    run = tmp_path / "run"
    args = [
        "train", "--model", model, "--hook-in", "mlp_in.1", "--hook-out", "mlp_out.1",
        "--skip-connection", "--text", text, "--out-dir", str(run), "--n-latents", "64",
        "--k", "4", "--steps", "4", "--batch-size", "32", "--init-tokens", "64",
        "--context-size", "16", "--shuffle-buffer", "64", "--no-progress", "--no-plots",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["output_scale"] > 0 and recorded["train"]["hook_in"] == "mlp_in.1"
    out = tmp_path / "eval.json"
    evaluate = ["eval", "--sae", str(run / "sae"), "--text", held, "--tokens", "200", "--ce"]
    assert main([*evaluate, "--ce-windows", "3", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 200 and {"fvu", "ce_loss_score", "kl_div_score"} <= set(result)
    for fmt in ("sparsify", "saelens"):
        code = main(["convert", str(run / "sae"), str(tmp_path / fmt), "--to", fmt])
        assert code == (0 if fmt == "sparsify" else 2)  # SAELens has no TopK transcoder
    assert "no 'topk' transcoder class" in capsys.readouterr().err
    back = SparseAutoencoder.load(tmp_path / "sparsify")
    assert back.transcoder and back.skip_connection
    board = tmp_path / "board"  # its latents read the input hook point
    assert main(["dashboard", "--sae", str(run / "sae"), "--text", held, "--out", str(board),
                 "--tokens", "300", "--features", "4", "--no-progress"]) == 0  # fmt: skip
    assert len(list((board / "features").glob("*.json"))) == 4
    assert main(["report", str(run), "--text", held, "--tokens", "300", "--device", "cpu"]) == 0
    drift = ["drift", "--sae", str(run / "sae"), "--text", text, "--against", held]
    drift += ["--tokens", "300", "--dashboard", str(tmp_path / "movers"), "--no-progress"]
    assert main(drift) == 0 and (tmp_path / "movers" / "movers.html").exists()
    page = (run / "report.html").read_text()
    assert "mlp_in.1" in page and "mlp_out.1" in page
    bad = ["train", "--model", model, "--hook-in", "mlp_in.1", "--out-dir", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "needs both hook_in and hook_out" in capsys.readouterr().err


def test_an_saelens_transcoder_evaluates_at_its_recorded_hook_points(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is the `bench` extra")
    model = save_model(tmp_path / "gpt")
    text = write_corpus(tmp_path / "text.txt")
    cfg = sae_lens.saes.SkipTranscoderConfig(d_in=32, d_sae=64, d_out=32,
                                             apply_b_dec_to_input=False)  # fmt: skip
    theirs = sae_lens.saes.SkipTranscoder(cfg)
    theirs.cfg.metadata.model_name = model
    theirs.cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"  # TransformerLens's names
    theirs.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    theirs.save_model(tmp_path / "tc")
    out = tmp_path / "eval.json"
    args = ["eval", "--sae", str(tmp_path / "tc"), "--text", text, "--tokens", "100"]
    assert main([*args, "--context-size", "16", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"] == 100  # it read mlp_in.1 and mlp_out.1


# A different, valid value of every option that shapes an SAE or its data, from the base run
# below (a transcoder on LinearPlusSparse, which reads none of the data options itself).
SHAPING = {
    "source": "synthetic", "model": "other", "hook": "resid_post.1", "hooks": "x,y",
    "hook_in": "x2", "hook_out": "y2", "text": "stdlib2.txt", "context_size": 64,
    "model_batch_size": 4, "shuffle_buffer": 512, "model_dtype": "float16", "synthetic_d": 8,
    "synthetic_features": 64, "synthetic_active": 3, "synthetic_noise": 0.1,
    "activation": "relu", "n_latents": 64, "expansion_factor": 4, "k": 3,
    "matryoshka": "8,32", "skip_connection": False, "dtype": "float64",
    "normalize_decoder": False, "b_dec_init": "zeros", "normalize_input": False,
    "init_tokens": 256, "batch_size": 64, "grad_accum": 2, "seed": 5,
    "jumprelu_bandwidth": 0.01, "clt": True, "layers": "0-1", "crosscoder": True,
    "model_b": "b",
}  # fmt: skip
_BASE_RUN = dict(
    source="model", model="synthetic", hook_in="x", hook_out="y", skip_connection=True,
    n_latents=32, k=2, steps=4, batch_size=32, init_tokens=128, dead_tokens=64,
    checkpoint_every=2, progress=False, plots=False,
)  # fmt: skip


def test_every_option_that_shaped_the_run_is_refused_by_name_on_resume(tmp_path):
    refused = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == REFUSE}
    assert set(SHAPING) == refused  # a new shaping option needs a case here
    base = tmp_path / "base"
    Trainer(TrainConfig(**_BASE_RUN, out_dir=str(base)), LinearPlusSparse()).train(until=2)
    for option, value in SHAPING.items():
        run = tmp_path / option
        shutil.copytree(base, run)
        changed = {**_BASE_RUN, option: value, "out_dir": str(run)}
        if option in ("hooks", "hook"):  # instead of hook_in and hook_out
            changed.update(hook_in=None, hook_out=None, skip_connection=False)
        if option == "source":
            changed.update(hook_in=None, hook_out=None, skip_connection=False, model=None)
        if option in ("clt", "layers"):  # a CLT over the model's layers, instead of hook_in
            changed.update(clt=True, layers="0-1", hook_in=None, hook_out=None)
        if option in ("crosscoder", "model_b"):  # a crosscoder of two models, instead
            changed.update(crosscoder=True, model_b="b", hook="x", hook_in=None, hook_out=None,
                           skip_connection=False)  # fmt: skip
        shown = f"{option}={value!r} (the checkpoint has "
        with pytest.raises(ConfigError, match=re.escape(shown)):
            Trainer(TrainConfig(**changed), LinearPlusSparse(), resume=True)
