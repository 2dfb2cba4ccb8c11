"""Many SAEs from one model pass: MultiTrainer against single-hook runs bit for bit, its
exact resume (also after a kill between the hooks' checkpoints), the CLI and the layer
sweep report."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from model_folders import save_bert, save_model, write_corpus
from models import tiny_bert
from test_sources_model import corpus
from test_trainer import assert_same_run, metric_rows

from sae_fast import SparseAutoencoder
from sae_fast.analysis.layers import METRICS
from sae_fast.cli import main
from sae_fast.files import FolderInUseError, lock_folder
from sae_fast.sources import ModelSource
from sae_fast.training import ConfigError, MultiTrainer, TrainConfig, Trainer
from sae_fast.training.checkpoints import list_checkpoints
from sae_fast.training.multi import is_multi_hook_run

HOOKS = ("resid_post.0", "encoder.layer.1.intermediate", "resid_post.1")
SOURCE = dict(context_size=16, batch_size=3, shuffle_buffer=60, seed=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the tiny BERT and tokenizer, a corpus)."""
    model, tokenizer = tiny_bert()
    return model, tokenizer, corpus(tmp_path_factory.mktemp("text") / "c.txt", 30)


def config(setup, out_dir, **kw) -> TrainConfig:
    opts = dict(
        source="model",
        model="tiny-bert",
        text=setup[2],
        n_latents=64,
        k=4,
        steps=8,
        batch_size=32,
        init_tokens=64,
        context_size=SOURCE["context_size"],
        model_batch_size=SOURCE["batch_size"],
        shuffle_buffer=SOURCE["shuffle_buffer"],
        seed=SOURCE["seed"],
        dead_tokens=64,
        lr=3e-3,
        log_every=2,
        checkpoint_every=3,
        out_dir=str(out_dir),
        progress=False,
        plots=False,
    )
    return TrainConfig(**{**opts, **kw})


def model_source(setup, hooks) -> ModelSource:
    model, tokenizer, text = setup
    return ModelSource(model, tokenizer, hooks, text, **SOURCE)


def multi(setup, out_dir, resume=False, **kw) -> MultiTrainer:
    cfg = config(setup, out_dir, hooks=",".join(HOOKS), **kw)
    return MultiTrainer(cfg, model_source(setup, HOOKS), resume=resume)


def test_each_sae_equals_its_single_hook_run_bit_for_bit(setup, tmp_path):
    trainer = multi(setup, tmp_path / "multi")
    results = trainer.train()
    assert [r.out_dir.name for r in results] == list(HOOKS)
    for hook, result, sub in zip(HOOKS, results, trainer.trainers, strict=True):
        single = Trainer(config(setup, tmp_path / hook, hook=hook), model_source(setup, hook))
        single.train()
        assert_same_run(single, sub)
        assert metric_rows(single) == metric_rows(sub)
        assert (result.out_dir / "sae" / "cfg.json").exists()
        provenance = json.loads((result.out_dir / "sae" / "cfg.json").read_text())["provenance"]
        assert provenance["hook"] == hook
    assert results[1].sae.d_in == 2 * results[0].sae.d_in  # the intermediate layer
    recorded = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert recorded["hooks"] == {hook: hook for hook in HOOKS}
    assert recorded["train"]["hooks"] == ",".join(HOOKS)
    assert is_multi_hook_run(tmp_path / "multi") and not is_multi_hook_run(tmp_path / HOOKS[0])


def test_stop_and_resume_equals_a_straight_run(setup, tmp_path):
    straight = multi(setup, tmp_path / "straight")
    straight.train()
    first = multi(setup, tmp_path / "split")
    assert [r.step for r in first.train(until=4)] == [4, 4, 4]
    resumed = multi(setup, tmp_path / "split", resume=True)
    assert resumed.step == 4
    resumed.train()
    for a, b in zip(straight.trainers, resumed.trainers, strict=True):
        assert_same_run(a, b)
        assert metric_rows(a) == metric_rows(b)


def test_a_kill_between_the_hooks_checkpoints_resumes_from_their_common_step(setup, tmp_path):
    straight = multi(setup, tmp_path / "straight")
    straight.train()
    killed = multi(setup, tmp_path / "killed")
    killed.train(until=6)  # checkpoints at steps 3 and 6
    # As if the process died after writing the first hook's step-6 checkpoint: the others
    # have step 3 as their newest.
    for hook in HOOKS[1:]:
        shutil.rmtree(tmp_path / "killed" / hook / "checkpoints" / "step-00000006")
    resumed = multi(setup, tmp_path / "killed", resume=True)
    assert resumed.step == 3
    first = resumed.trainers[0].checkpoints
    assert [p.name for p in list_checkpoints(first)] == ["step-00000003"]
    assert any(p.name.startswith("abandoned-") for p in first.iterdir())
    resumed.train()
    for a, b in zip(straight.trainers, resumed.trainers, strict=True):
        assert_same_run(a, b)


# A child that trains through the command line and kills itself (SIGKILL) right after the
# first checkpoint folder of the run appears: the first hook point has step 3, the others none.
_KILLED_AFTER_FIRST_SAVE = """
import os, signal, sys
from sae_fast.cli import main
from sae_fast.training import checkpoints
real = checkpoints.save
def save(*args, **kw):
    done = real(*args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_between_the_hooks_first_checkpoints_resumes(tmp_path, capsys):
    model = save_model(tmp_path / "gpt")
    text = write_corpus(tmp_path / "train.txt")
    run, hooks = tmp_path / "run", ["resid_post.0", "resid_post.1"]
    args = train_args(model, text, run, ",".join(hooks))
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_FIRST_SAVE, *args])
    assert killed.returncode == -signal.SIGKILL
    steps = {h: [p.name for p in list_checkpoints(run / h / "checkpoints")] for h in hooks}
    assert steps == {hooks[0]: ["step-00000003"], hooks[1]: []}
    assert main(args) == 2  # a fresh start on it is refused, as for any run with checkpoints
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--resume", "--out-dir", str(run)]) == 0
    assert "every SAE starts again from step 0" in capsys.readouterr().out
    for hook in hooks:
        rows = [json.loads(line) for line in (run / hook / "metrics.jsonl").open()]
        assert [r["step"] for r in rows] == [3, 6]
    aside = [p for p in (run / hooks[0] / "checkpoints").iterdir() if p.name.startswith("aband")]
    assert sorted(p.name for p in aside[0].iterdir()) == ["metrics.jsonl", "step-00000003"]
    # The resumed run is the run a straight one is.
    straight = tmp_path / "straight"
    assert main(train_args(model, text, straight, ",".join(hooks))) == 0
    for hook in hooks:
        resumed, once = (SparseAutoencoder.load(r / hook / "sae") for r in (run, straight))
        for name, tensor in once.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], tensor), (hook, name)


def test_resume_refusals(setup, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        multi(setup, tmp_path / "none", resume=True)
    multi(setup, tmp_path / "run").train(until=3)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        multi(setup, tmp_path / "run")
    with pytest.raises(ConfigError, match="resumes as a whole"):
        multi(setup, tmp_path / "run", resume=str(tmp_path / "run" / HOOKS[0]))
    with pytest.raises(ConfigError, match="trained with other values"):
        multi(setup, tmp_path / "run", resume=True, k=5)
    with pytest.raises(ConfigError, match=r"3 SAEs \(float32, with Adam\) needs"):
        multi(setup, tmp_path / "huge", n_latents=10**11)  # all of them together
    with pytest.raises(ConfigError, match="keep_checkpoints >= 2"):
        multi(setup, tmp_path / "one-kept", keep_checkpoints=1)
    with pytest.raises(ConfigError, match="but the source reads"):
        MultiTrainer(
            config(setup, tmp_path / "x", hooks="resid_post.0"), model_source(setup, HOOKS)
        )
    with lock_folder(tmp_path / "run" / HOOKS[1], "test"), pytest.raises(FolderInUseError):
        multi(setup, tmp_path / "run", resume=True)
    multi(setup, tmp_path / "run", resume=True).train()  # the failed attempts left no locks


def test_hooks_options_are_checked():
    base = dict(source="model", model="m")
    with pytest.raises(ConfigError, match="hooks replaces hook"):
        TrainConfig(**base, hook="resid_post.0", hooks="resid_post.1")
    with pytest.raises(ConfigError, match="hooks: the range 'resid_post.2-0' runs backwards"):
        TrainConfig(**base, hooks="resid_post.2-0")
    with pytest.raises(ConfigError, match="hooks replaces hook, and needs source=model"):
        TrainConfig(source="synthetic", hooks="resid_post.0")
    with pytest.raises(ConfigError, match="needs both model and hook"):
        TrainConfig(source="model", model="m")


def train_args(model, text, out, hooks, *extra):
    return [
        "train",
        "--model", model, "--hooks", hooks, "--text", text, "--out-dir", str(out),
        "--n-latents", "64", "--k", "4", "--steps", "6", "--batch-size", "32",
        "--init-tokens", "64", "--context-size", "16", "--shuffle-buffer", "64",
        "--model-batch-size", "4", "--dead-tokens", "64", "--log-every", "3",
        "--checkpoint-every", "3", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


def report_rows(run) -> list[dict]:
    return json.loads((run / "layers.json").read_text())["rows"]


def test_cli_trains_every_hook_and_writes_the_layer_sweep(tmp_path, capsys):
    model = save_model(tmp_path / "gpt")
    text = write_corpus(tmp_path / "train.txt")
    held = write_corpus(tmp_path / "held.txt", paragraphs=20)
    run = tmp_path / "run"
    assert main(train_args(model, text, run, "resid_post.0-1,mlp_out.1")) == 0
    out = capsys.readouterr().out
    assert "resid_post.0: step 6/6" in out and "layer sweep report" in out
    hooks = ["resid_post.0", "resid_post.1", "mlp_out.1"]
    for hook in hooks:
        assert (run / hook / "sae" / "sae.safetensors").exists()
        assert (run / hook / "training_curves.png").exists()
    rows = report_rows(run)
    assert [r["hook"] for r in rows] == hooks
    logged = [json.loads(line) for line in (run / hooks[1] / "metrics.jsonl").open()]
    assert rows[1]["fvu"] == logged[-1]["fvu"] and rows[1]["step"] == 6
    assert rows[1]["one_minus_fvu"] == pytest.approx(1 - logged[-1]["fvu"])
    assert "ce_loss_score" not in rows[0]  # training rows have no CE
    # Held out: every SAE on the same tokens, and a CE score for the causal LM.
    assert main(["layers", str(run), "--text", held, "--tokens", "300", "--ce-windows", "3",
                 "--device", "cpu"]) == 0  # fmt: skip
    rows = report_rows(run)
    assert {r["tokens"] for r in rows} == {300}
    assert all({"ce_loss_score", "kl_div_score", "fvu", "dead_fraction"} <= set(r) for r in rows)
    page = (run / "layers.html").read_text()
    assert page.count("<tr><th><a href=") == 3 and "CE loss score" in page
    assert "class='best'" in page
    assert (run / "layers.png").read_bytes()[:4] == b"\x89PNG"
    # The run resumes as a whole from its config.json, and steps on to --steps.
    assert main(["train", "--resume", "--out-dir", str(run), "--steps", "9"]) == 0
    assert [r["step"] for r in report_rows(run)] == [9, 9, 9]


def test_layers_of_an_encoder_have_no_ce_column(tmp_path):
    model = save_bert(tmp_path / "bert")
    text = write_corpus(tmp_path / "train.txt")
    run = tmp_path / "run"
    assert main(train_args(model, text, run, "resid_post.0-1", "--no-plots")) == 0
    assert not (run / "layers.html").exists()  # --no-plots: no report
    assert main(["layers", str(run), "--text", text, "--tokens", "200", "--device", "cpu"]) == 0
    rows = report_rows(run)
    assert [r["hook"] for r in rows] == ["resid_post.0", "resid_post.1"]
    assert not any("ce_loss_score" in r for r in rows)
    assert "CE loss score" not in (run / "layers.html").read_text()
    assert [key for key, _, _ in METRICS][-1] == "ce_loss_score"


def test_cli_errors_exit_2(tmp_path, capsys):
    model = save_model(tmp_path / "gpt")
    text = write_corpus(tmp_path / "train.txt")
    assert main(train_args(model, text, tmp_path / "a", "resid_post.0,resid_post.9")) == 2
    assert "hook point 'resid_post.9' is not in this" in capsys.readouterr().err
    assert main(train_args(model, text, tmp_path / "b", "resid_post.1-0")) == 2
    assert "runs backwards" in capsys.readouterr().err
    assert main(["train", "--model", model, "--hook", "resid_post.0", "--out-dir",
                 str(tmp_path / "single"), "--steps", "2", "--batch-size", "16",
                 "--init-tokens", "16", "--text", text, "--context-size", "16",
                 "--no-progress", "--no-plots"]) == 0  # fmt: skip
    assert main(["layers", str(tmp_path / "single")]) == 2
    assert "is not a multi-hook run" in capsys.readouterr().err
    assert main(["layers", str(tmp_path / "missing")]) == 2
