"""Run folders a researcher can trust: resume branches, options on resume, checkpoints that
are SAEs, provenance, the metrics log, locks and defaults scaled to short runs."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from test_trainer import assert_same_run, config, source

from sae_fast import SparseAutoencoder
from sae_fast.files import FolderInUseError
from sae_fast.training import metrics
from sae_fast.training.checkpoints import list_checkpoints
from sae_fast.training.config import ConfigError, TrainConfig
from sae_fast.training.optimizer import lr_factor
from sae_fast.training.trainer import Trainer
from sae_fast.version import VERSION


def steps_of(run) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(run / "checkpoints")]


def test_resuming_an_older_checkpoint_makes_it_the_newest(tmp_path):
    cfg = config(tmp_path, checkpoint_every=2, keep_checkpoints=10)
    Trainer(cfg, source()).train()
    run = tmp_path / "run"
    assert steps_of(run) == [2, 4, 6, 8, 10, 12]
    resumed = Trainer(cfg, source(), resume=run / "checkpoints" / "step-00000006")
    assert steps_of(run) == [2, 4, 6]
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert sorted(p.name for p in aside[0].iterdir()) == [
        "metrics.jsonl",  # the branch's rows, which the run's log no longer has
        "sae",
        "step-00000008",
        "step-00000010",
        "step-00000012",
    ]
    resumed.train(until=8)
    assert steps_of(run) == [2, 4, 6, 8]
    again = Trainer(cfg, source(), resume=True)  # continues the new branch, from step 8
    assert again.step == 8
    assert [r["step"] for r in metrics.read_jsonl(run / "metrics.jsonl")] == [2, 4, 6, 8]


def test_resume_applies_the_optimizer_options_and_says_so(tmp_path, capsys):
    Trainer(config(tmp_path), source()).train(until=4)
    changed = config(tmp_path, lr=1e-2, adam_beta1=0.5, adam_eps=1e-6, steps=20)
    resumed = Trainer(changed, source(), resume=True)
    out = capsys.readouterr().out
    for line in ("lr=0.01 (the checkpoint had 0.003)", "adam_beta1=0.5", "steps=20"):
        assert f"resuming with {line}" in out
    group = resumed.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-2 * lr_factor(4, changed))
    assert group["betas"] == (0.5, 0.999) and group["eps"] == 1e-6
    resumed.train(until=5)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(5, changed))


@pytest.mark.parametrize(
    ("option", "value"), [("batch_size", 32), ("seed", 1), ("k", 4), ("synthetic_d", 8)]
)
def test_resume_refuses_options_that_shaped_the_run(tmp_path, option, value):
    Trainer(config(tmp_path), source()).train(until=4)
    with pytest.raises(ConfigError, match=rf"{option}={value} \(the checkpoint has "):
        Trainer(config(tmp_path, **{option: value}), source(), resume=True)


def test_resume_refuses_steps_below_the_checkpoint(tmp_path):
    Trainer(config(tmp_path), source()).train(until=8)
    with pytest.raises(ConfigError, match="steps=5 is below the checkpoint's step 8"):
        Trainer(config(tmp_path, steps=5), source(), resume=True)


def test_a_checkpoint_is_the_sae_for_raw_activations_and_resumes_exactly(tmp_path):
    src = source()
    scaled = lambda: source()  # noqa: E731
    straight = Trainer(config(tmp_path, "straight", steps=8), scaled())
    straight.train()
    assert straight.scale != 1.0  # the input scale is folded into what is saved
    run = tmp_path / "straight"
    from_checkpoint = SparseAutoencoder.load(run / "checkpoints" / "step-00000008")
    final = SparseAutoencoder.load(run / "sae")
    for (name, a), b in zip(
        final.state_dict().items(), from_checkpoint.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    x = src.next_batch(256)
    assert torch.equal(from_checkpoint(x).x_hat, final(x).x_hat)
    # ...and resuming from it is still exact (the training-time biases are in the state).
    split = Trainer(config(tmp_path, "split", steps=8), scaled())
    split.train(until=4)
    resumed = Trainer(config(tmp_path, "split", steps=8), scaled(), resume=True)
    resumed.train()
    assert_same_run(straight, resumed)


def test_the_saved_sae_records_what_it_was_trained_on(tmp_path):
    Trainer(config(tmp_path), source()).train()
    sae = SparseAutoencoder.load(tmp_path / "run" / "sae")
    p = sae.provenance
    assert p["step"] == 12 and p["tokens"] == 12 * 64 and p["sae_fast_version"] == VERSION
    assert p["source"]["kind"] == "synthetic" and p["train"]["n_latents"] == 48
    body = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert body["provenance"] == p


def test_a_crash_while_rewriting_the_log_keeps_the_history(tmp_path, monkeypatch):
    Trainer(config(tmp_path), source()).train(until=8)
    log = tmp_path / "run" / "metrics.jsonl"
    before = log.read_text()

    def crash(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsLog(log).truncate_after(4)
    assert log.read_text() == before
    assert not [p for p in log.parent.iterdir() if p.name.startswith(".metrics")]


def test_killed_checkpoint_writes_are_cleaned_up_and_never_listed(tmp_path):
    Trainer(config(tmp_path), source()).train(until=4)
    ckpts = tmp_path / "run" / "checkpoints"
    killed = ckpts / f".step-00000008.saving~{socket.gethostname()}~999999999~abcd"  # no such pid
    killed.mkdir()
    (killed / "train_state.pt").write_bytes(b"partial")
    assert steps_of(tmp_path / "run") == [4]
    Trainer(config(tmp_path), source(), resume=True)
    assert not killed.exists()


def test_two_trainers_cannot_share_a_run_folder(tmp_path):
    first = Trainer(config(tmp_path), source())
    with pytest.raises(FolderInUseError, match="in use by another sae-fast training run"):
        Trainer(config(tmp_path), source())
    first.train()  # releases the folder at its end
    Trainer(config(tmp_path, steps=14), source(), resume=True).train()


def test_short_runs_warm_up_for_a_tenth_and_say_what_cannot_act(tmp_path, capsys):
    cfg = TrainConfig(source="synthetic", steps=100, lr_warmup_steps=None)
    assert cfg.warmup_steps() == 10 and lr_factor(10, cfg) == 1.0
    assert TrainConfig(source="synthetic", steps=5000).warmup_steps() == 100
    Trainer(config(tmp_path, dead_tokens=10_000_000, lr_warmup_steps=20), source()).train()
    out = capsys.readouterr().err
    assert "lr_warmup_steps=20 >= steps=12" in out
    assert "dead_tokens=10,000,000 is more than this run's 768 tokens" in out


def test_runs_without_a_progress_bar_print_log_lines(tmp_path, capsys):
    Trainer(config(tmp_path, log_every=4), source()).train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/12", "8/12", "12/12"]
    assert all("fvu" in line and "tokens/s" in line for line in lines)


def test_a_dictionary_too_large_for_the_machine_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"n_latents=1000000000000 x d_in=16 .* needs"):
        Trainer(config(tmp_path, n_latents=10**12), source())


def test_switching_to_fp16_autocast_on_resume_starts_a_fresh_loss_scaler(tmp_path):
    Trainer(config(tmp_path), source()).train(until=4)  # autocast none: an empty scaler state
    resumed = Trainer(config(tmp_path, autocast="fp16"), source(), resume=True)
    assert resumed.scaler.is_enabled()
    assert resumed.train().step == 12
