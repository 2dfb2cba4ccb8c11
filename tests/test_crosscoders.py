"""Crosscoders: one dictionary over several sources, trained as an SAE over them side by side.
Model diffing finds the features a known pair of sources does not share; the per-source
scales fold in exactly; a stop and resume equals a straight run; `sae-fast train
--crosscoder` runs over hook points of one real model and over two real models on the same
tokens, and `sae-fast diff` reports on it."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from model_folders import save_model, write_corpus
from models import tiny_causal_lm

from sae_fast import SparseAutoencoder
from sae_fast.analysis.model_diff import NotACrosscoderError, diff_report
from sae_fast.cli import main
from sae_fast.training import CrosscoderTrainer, TrainConfig
from sae_fast.training.checkpoints import SAE_DIR


class TwoModels:
    """Rows (a, b) side by side, 16 wide each, as two models' hook point would give them:
    8 shared features write in both (along a direction of their own in each), 4 write in a
    alone and 4 in b alone; 2 features active per row, with b's activations 3 times a's.
    """

    SHARED, ONLY = 8, 4
    WIDTH = 16

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        n = self.SHARED + 2 * self.ONLY
        unit = torch.nn.functional.normalize
        self.A = unit(torch.randn(n, self.WIDTH, generator=g), dim=1)
        self.B = 3 * unit(torch.randn(n, self.WIDTH, generator=g), dim=1)
        self.A[self.SHARED + self.ONLY :] = 0  # b's own features
        self.B[self.SHARED : self.SHARED + self.ONLY] = 0  # a's own features
        self.widths = (self.WIDTH, self.WIDTH)
        self.d_in = 2 * self.WIDTH
        self.g = torch.Generator().manual_seed(seed + 1)

    def next_batch(self, n: int) -> torch.Tensor:
        features = len(self.A)
        pick = torch.rand(n, features, generator=self.g).argsort(1)[:, :2]
        z = torch.zeros(n, features).scatter_(1, pick, 1 + torch.rand(n, 2, generator=self.g))
        return torch.cat([z @ self.A, z @ self.B], dim=1)

    def state_dict(self) -> dict:
        return {"g": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["g"])

    def describe(self) -> dict:
        return {"kind": "two-models"}


OPTIONS = dict(
    source="model", model="a", model_b="b", hook="resid_post.0", crosscoder=True,
    n_latents=48, k=2, batch_size=256, init_tokens=512, lr=1e-2, lr_warmup_steps=20,
    dead_tokens=2048, log_every=100, checkpoint_every=0, plots=False, progress=False,
    device="cpu",
)  # fmt: skip


def test_model_diffing_finds_the_features_each_model_has_alone(tmp_path):
    source = TwoModels()
    cfg = TrainConfig(**OPTIONS, steps=500, out_dir=str(tmp_path / "run"))
    result = CrosscoderTrainer(cfg, source).train()
    sae = SparseAutoencoder.load(tmp_path / "run" / SAE_DIR)
    recorded = sae.provenance["crosscoder"]
    assert recorded["sources"] == ["a:resid_post.0", "b:resid_post.0"]
    assert recorded["widths"] == [16, 16] and recorded["model_b"] == "b"
    assert recorded["scales"][0] == pytest.approx(3 * recorded["scales"][1], rel=0.05)
    assert result.final["fvu/a:resid_post.0"] < 0.1 and result.final["fvu/b:resid_post.0"] < 0.1
    report = diff_report(sae, top=48)
    share_of_b = {row["latent"]: row["share"] for row in report["top"]["b:resid_post.0"]}
    # Each true feature's latent: the one whose decoder (both halves, in raw units) points
    # along it.
    truth = torch.nn.functional.normalize(torch.cat([source.A, source.B], dim=1), dim=1)
    learned = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cosine, latent = (truth @ learned.T).max(dim=1)
    assert cosine.min() > 0.9, cosine
    shared, only_a = range(8), range(8, 12)
    assert all(share_of_b[int(latent[f])] < 0.1 for f in only_a)
    assert all(share_of_b[int(latent[f])] > 0.9 for f in range(12, 16))
    assert all(0.3 < share_of_b[int(latent[f])] < 0.7 for f in shared)
    assert report["specific"]["a:resid_post.0"] >= 4 and report["specific"]["b:resid_post.0"] >= 4
    # The raw activations reconstruct: the per-source scales (b is 3x a) are folded in.
    rows = source.next_batch(512)
    fvu = (rows - sae(rows).x_hat).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
    assert fvu < 0.1


def test_the_column_fold_keeps_the_code_and_gives_raw_units():
    torch.manual_seed(0)
    sae = SparseAutoencoder(6, 20, k=3, dtype=torch.float64)
    scales = torch.tensor([2.0, 2, 2, 0.5, 0.5, 0.5], dtype=torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)
    trained = sae(x * scales)
    folded = SparseAutoencoder(6, 20, k=3, dtype=torch.float64)
    folded.load_state_dict(sae.state_dict())
    folded.fold_column_scales_(scales)
    raw = folded(x)
    assert torch.equal(raw.code.indices, trained.code.indices)
    torch.testing.assert_close(raw.code.values, trained.code.values)
    torch.testing.assert_close(raw.x_hat, trained.x_hat / scales)
    with pytest.raises(ValueError, match="finite positive"):
        folded.fold_column_scales_(torch.zeros(6))


def test_a_stopped_and_resumed_crosscoder_equals_a_straight_one(tmp_path):
    def run(name: str, resume=False):
        options = {**OPTIONS, "lr_warmup_steps": 0, "checkpoint_every": 3, "dead_tokens": 256}
        cfg = TrainConfig(**options, steps=6, out_dir=str(tmp_path / name))
        return CrosscoderTrainer(cfg, TwoModels(), resume)

    straight = run("a").train()
    run("b").train(until=3)
    resumed = run("b", resume=True)
    assert resumed.step == 3 and resumed.scale == straight_scales(tmp_path / "a")
    got = resumed.train()
    for name, t in straight.sae.state_dict().items():
        assert torch.equal(got.sae.state_dict()[name], t), name


def straight_scales(run) -> list[float]:
    return json.loads((run / "config.json").read_text())["input_scale"]


def test_options_a_crosscoder_refuses():
    from sae_fast.training.config import ConfigError

    for options, message in [
        (dict(model_b=None), "two sources or more"),
        (dict(crosscoder=False), "model_b is a crosscoder's second model"),
        (dict(source="synthetic", model=None), "crosscoder reads source=model"),
        (dict(clt=True, layers="0-1", hook=None), "not with hook_in or clt"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**{**OPTIONS, **options})


def test_cli_trains_crosscoders_on_real_models_and_diffs_them(tmp_path, capsys):
    a = save_model(tmp_path / "a")
    b = save_model(tmp_path / "b", build=partial(tiny_causal_lm, seed=1))
    text = write_corpus(tmp_path / "text.txt")
    common = ["--n-latents", "64", "--k", "4", "--batch-size", "64", "--init-tokens", "128",
              "--steps", "10", "--context-size", "32", "--shuffle-buffer", "256",
              "--device", "cpu", "--no-progress", "--no-plots", "--text", text]  # fmt: skip
    hooks = tmp_path / "hooks"
    args = ["train", "--model", a, "--crosscoder", "--hooks", "resid_post.0,resid_post.1"]
    assert main([*args, "--out-dir", str(hooks), *common]) == 0
    sae = SparseAutoencoder.load(hooks / SAE_DIR)
    assert sae.d_in == 64 and sae.provenance["crosscoder"]["sources"] == [
        "resid_post.0", "resid_post.1",
    ]  # fmt: skip
    pair = tmp_path / "pair"
    args = ["train", "--model", a, "--model-b", b, "--crosscoder", "--hook", "resid_post.1"]
    assert main([*args, "--out-dir", str(pair), *common]) == 0
    assert f"sae-fast diff {pair / SAE_DIR}" in capsys.readouterr().out
    out = tmp_path / "diff"
    assert main(["diff", str(pair / SAE_DIR), "--top", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| only a:resid_post.1 |" in printed and "| shared |" in printed
    report = json.loads((out / "diff.json").read_text())
    assert sum(report["specific"].values()) + report["shared"] == 64
    assert sum(report["histogram"]["counts"]) == 64
    assert (out / "relative_norms.png").stat().st_size > 0
    assert main(["diff", str(pair / SAE_DIR), "--top", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report
    # eval rereads both models at the recorded hook point, on the same tokens.
    evaluated = tmp_path / "eval.json"
    assert main(["eval", "--sae", str(pair / SAE_DIR), "--text", text, "--tokens", "100",
                 "--out", str(evaluated)]) == 0  # fmt: skip
    assert json.loads(evaluated.read_text())["tokens"] == 100
    assert main(["eval", "--sae", str(pair / SAE_DIR), "--text", text, "--ce"]) == 2
    assert "a crosscoder reads several" in capsys.readouterr().err
    board = ["dashboard", "--sae", str(hooks / SAE_DIR), "--text", text]
    assert main([*board, "--out", str(tmp_path / "board")]) == 2
    assert "is a crosscoder" in capsys.readouterr().err
    # What is not a crosscoder, and bad options, are refused in one line.
    plain = SparseAutoencoder(8, 16, k=2)
    plain.save(tmp_path / "plain")
    assert main(["diff", str(tmp_path / "plain")]) == 2
    assert "is not a crosscoder" in capsys.readouterr().err
    with pytest.raises(NotACrosscoderError):
        diff_report(plain)
    with pytest.raises(SystemExit) as exit_:
        main(["diff", str(pair / SAE_DIR), "--specific", "0.2"])
    assert exit_.value.code == 2 and "--specific: expected a share" in capsys.readouterr().err
    assert main(["train", "--model", a, "--crosscoder", "--hook", "resid_post.0", *common]) == 2
    assert "two sources or more" in capsys.readouterr().err
