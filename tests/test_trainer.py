"""The trainer: exact resume, Ctrl-C, NaN stop, checkpoint rotation, every activation, AuxK."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from sae_fast import SparseAutoencoder, reference
from sae_fast.sources.synthetic import SyntheticSource, feature_recovery
from sae_fast.training.checkpoints import list_checkpoints
from sae_fast.training.config import ConfigError, TrainConfig
from sae_fast.training.losses import LossWeights, auxk_term, training_loss
from sae_fast.training.metrics import read_jsonl
from sae_fast.training.optimizer import lr_factor
from sae_fast.training.trainer import Trainer, TrainingDivergedError


def config(tmp_path, name: str = "run", **kw) -> TrainConfig:
    opts = dict(
        source="synthetic",
        n_latents=48,
        k=3,
        steps=12,
        batch_size=64,
        lr=3e-3,
        lr_warmup_steps=3,
        init_tokens=128,
        dead_tokens=128,
        log_every=2,
        checkpoint_every=4,
        out_dir=str(tmp_path / name),
        progress=False,
        plots=False,
    )
    return TrainConfig(**{**opts, **kw})


def source(**kw) -> SyntheticSource:
    return SyntheticSource(**{"d_in": 16, "n_features": 32, "k_active": 3, "seed": 3, **kw})


class Hook(SyntheticSource):
    """A synthetic source that runs `action` when batch number `at` is drawn (1-based)."""

    def __init__(self, at: int, action, **kw) -> None:
        super().__init__(**{"d_in": 16, "n_features": 32, "k_active": 3, "seed": 3, **kw})
        self.at, self.action, self.calls = at, action, 0

    def next_batch(self, n: int) -> torch.Tensor:
        x = super().next_batch(n)
        self.calls += 1
        return self.action(x) if self.calls == self.at else x


class Rows:
    """The rows of a fixed tensor in order, cycling: batches do not depend on how it is split."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.d_in, self.pos = rows, rows.shape[1], 0

    def next_batch(self, n: int) -> torch.Tensor:
        idx = (self.pos + torch.arange(n)) % self.rows.shape[0]
        self.pos += n
        return self.rows[idx]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]

    def describe(self) -> dict:
        return {"kind": "rows", "n": self.rows.shape[0]}


def assert_same_run(a: Trainer, b: Trainer) -> None:
    for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert torch.equal(a.stats.since_fired, b.stats.since_fired)
    assert a.step == b.step


def metric_rows(trainer: Trainer) -> list[dict]:
    rows = read_jsonl(trainer.out_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.parametrize(
    "options",
    [{"activation": "topk"}, {"activation": "batchtopk"}, {"adam_moments": "bf16"}],
    ids=["topk", "batchtopk", "bf16-moments"],
)
def test_n_steps_then_resume_n_steps_equals_2n_straight(tmp_path, options):
    kw = {**options, "n_latents": 256}  # wide enough for dead latents
    straight = Trainer(config(tmp_path, "straight", **kw), source())
    straight.train()
    first = Trainer(config(tmp_path, "split", **kw), source())
    assert first.train(until=6).step == 6
    saved = [p.name for p in list_checkpoints(first.checkpoints)]
    assert saved == ["step-00000004", "step-00000006"]
    resumed = Trainer(config(tmp_path, "split", **kw), source(), resume=True)
    assert resumed.step == 6
    resumed.train()
    assert_same_run(straight, resumed)
    assert metric_rows(straight) == metric_rows(resumed)
    # AuxK was active after the resume point, so the dead-latent counters were restored.
    assert any("auxk" in row for row in metric_rows(resumed) if row["step"] > 6)
    moments = {s["exp_avg"].dtype for s in resumed.optimizer.state.values()}
    assert moments == {torch.bfloat16 if "adam_moments" in options else torch.float32}


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    def interrupt(x):
        os.kill(os.getpid(), signal.SIGINT)
        return x

    straight = Trainer(config(tmp_path, "straight"), source())
    straight.train()
    stopped = Trainer(config(tmp_path, "split"), Hook(at=8, action=interrupt))
    result = stopped.train()
    assert result.interrupted
    # batch 1 set b_dec and the scale; batch 8 is step 7's, which completes before stopping.
    assert result.step == 7
    assert list_checkpoints(stopped.checkpoints)[-1].name == "step-00000007"
    assert not (stopped.out_dir / "sae").exists()  # the run is not finished
    resumed = Trainer(config(tmp_path, "split"), source(), resume=True)
    resumed.train()
    assert_same_run(straight, resumed)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_activations_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(config(tmp_path), Hook(at=7, action=lambda x: x * math.nan))
    before = None
    with pytest.raises(TrainingDivergedError, match="step 6: the activations became NaN"):
        before = trainer.train()
    assert before is None
    assert [p.name for p in list_checkpoints(trainer.checkpoints)] == ["step-00000004"]
    resumed = Trainer(config(tmp_path), source(), resume=True)
    assert resumed.step == 4
    assert all(torch.isfinite(p).all() for p in resumed.sae.parameters())


def test_checkpoints_rotate_and_leave_no_temporaries(tmp_path):
    trainer = Trainer(config(tmp_path, keep_checkpoints=2, checkpoint_every=2), source())
    trainer.train()
    names = sorted(p.name for p in trainer.checkpoints.iterdir())
    assert names == ["step-00000010", "step-00000012"]
    assert (trainer.out_dir / "sae" / "sae.safetensors").is_file()


def test_refuses_to_overwrite_and_checks_resume(tmp_path):
    Trainer(config(tmp_path), source()).train(until=4)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(config(tmp_path), source())
    with pytest.raises(ConfigError, match=r"activation='relu' \(the checkpoint has 'topk'\)"):
        Trainer(config(tmp_path, activation="relu"), source(), resume=True)
    with pytest.raises(ConfigError, match=r"n_latents=64 \(the checkpoint has 48\)"):
        Trainer(config(tmp_path, n_latents=64), source(), resume=True)
    with pytest.raises(ConfigError, match="no checkpoint in"):
        Trainer(config(tmp_path, "empty"), source(), resume=True)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu", "gated"])
def test_saved_sae_works_on_raw_activations(tmp_path, activation):
    src = source(value_range=(5.0, 15.0))  # far from unit norm: the scale matters
    trainer = Trainer(config(tmp_path, activation=activation, l1_coef=0.05, l0_coef=0.05), src)
    result = trainer.train()
    assert result.step == 12 and not result.interrupted
    assert trainer.scale < 0.5
    loaded = SparseAutoencoder.load(result.out_dir / "sae")
    x = source(value_range=(5.0, 15.0), seed=9).next_batch(32)
    trainer.sae.eval()
    if activation == "batchtopk":  # the trained module at inference uses the same threshold
        trainer.sae.threshold.fill_(trainer.batchtopk_threshold)
        assert trainer.batchtopk_threshold > 0
    want = trainer.sae(x * trainer.scale).x_hat / trainer.scale
    torch.testing.assert_close(loaded(x).x_hat, want, rtol=1e-4, atol=1e-4)
    assert loaded.config()["activation"] == activation


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu", "gated"])
def test_every_activation_learns(tmp_path, activation):
    cfg = config(tmp_path, activation=activation, steps=200, log_every=10, l1_coef=0.05, lr=1e-2)
    cfg.l0_coef = 0.02
    Trainer(cfg, source()).train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"]
    assert set(rows[-1]) >= {"mse", "fvu", "l0", "dead_fraction", "dense_fraction", "lr"}


def test_topk_recovers_the_true_features(tmp_path):
    cfg = config(tmp_path, steps=300, checkpoint_every=0, batch_size=128, lr=1e-2, dead_tokens=2048)
    src = source()
    result = Trainer(cfg, src).train()
    assert feature_recovery(src.true_features, result.sae.W_dec.detach()) > 0.9


def test_auxk_term_is_the_reference_loss_in_per_token_units():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 40, k=3, dtype=torch.float64)
    x = torch.randn(10, 8, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    code, aux = sae.encode_with_auxk(x, dead, 5)
    x_hat = sae.decode(code)
    got = auxk_term(x, x_hat, aux, sae)
    pre = reference.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec)
    want = reference.auxk_loss(x, x_hat, pre, sae.W_dec, dead, 5)
    variance = (x - x.mean(dim=0)).pow(2).sum() / x.shape[0]
    torch.testing.assert_close(got, want * variance)
    step = training_loss(sae, x, LossWeights(auxk=0.5, k_aux=5), dead)
    torch.testing.assert_close(step.loss, step.terms["recon"] + 0.5 * got)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    def run(name, **kw):
        cfg = config(tmp_path, name, dtype="float64", auxk_coef=0.0, steps=3, **kw)
        t = Trainer(cfg, Rows(source().next_batch(1000).double()))
        t.train()
        return t

    one, two = run("one", batch_size=64), run("two", batch_size=32, grad_accum=2)
    for p, q in zip(one.sae.parameters(), two.sae.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_bf16_autocast_trains(tmp_path):
    result = Trainer(config(tmp_path, autocast="bf16", steps=20), source()).train()
    assert math.isfinite(result.final["loss"]) and result.final["fvu"] < 1.0


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(source="synthetic", steps=100, lr_warmup_steps=10, lr_decay_start=0.5)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == 1.0 and lr_factor(49, cfg) == 1.0
    assert lr_factor(75, cfg) == pytest.approx(0.5)
    cfg.lr_decay = "cosine"
    assert lr_factor(75, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) < 0.01
    cfg.lr_decay = "none"
    assert lr_factor(99, cfg) == 1.0
