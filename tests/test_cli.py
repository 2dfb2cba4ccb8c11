"""The `sae-fast` command: train, resume, config files, cache, eval, and its error messages."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from model_folders import identity_sae, save_bert, save_model, write_corpus
from models import WIDTH, minilm_tokenizer

from sae_fast import SparseAutoencoder
from sae_fast.apps import demo, toy
from sae_fast.cli import main
from sae_fast.cli.summary import cell, table
from sae_fast.sources import read_manifest
from sae_fast.training.checkpoints import list_checkpoints
from sae_fast.training.config import TrainConfig
from sae_fast.training.metrics import read_jsonl

SYNTHETIC = {
    "source": "synthetic",
    "synthetic_d": 16,
    "synthetic_features": 32,
    "synthetic_active": 3,
    "n_latents": 32,
    "k": 4,
    "batch_size": 64,
    "init_tokens": 128,
    "lr": 0.003,
    "progress": False,
    "plots": False,
}
# Small windows and buffers for the tiny models (64 positions) and the small corpus.
MODEL_DATA = ["--context-size", "32", "--model-batch-size", "8", "--shuffle-buffer", "256"]


def flags(**options) -> list[str]:
    """Command-line flags for TrainConfig options (booleans as --x / --no-x)."""
    out = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


def synthetic(run, **options) -> list[str]:
    return ["train", *flags(**{**SYNTHETIC, "out_dir": run, **options})]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def printed_json(text: str) -> dict:
    """The JSON object a command printed first."""
    return json.JSONDecoder().raw_decode(text[text.index("{") :])[0]


def error_line(err: str) -> str:
    """The command's one error line (transformers may print progress bars beside it)."""
    assert "Traceback" not in err
    lines = [
        line
        for line in err.splitlines()
        if line.startswith("sae-fast") and not line.startswith("sae-fast: warning:")
    ]
    assert len(lines) == 1, err
    return lines[0]


def steps_saved(run) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(run / "checkpoints")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny GPT-2 folder, a tiny BERT folder and a small .txt corpus."""
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt": save_model(root / "gpt"),
        "bert": save_bert(root / "bert"),
        "text": write_corpus(root / "corpus.txt"),
    }


def test_train_synthetic_then_resume_with_more_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=4, checkpoint_every=2, log_every=2), "--json") == 0
    out = capsys.readouterr().out
    assert printed_json(out)["step"] == 4
    assert f"saved the SAE to {run / 'sae'}" in out
    assert {p.name for p in run.iterdir()} >= {"sae", "metrics.jsonl", "checkpoints", "config.json"}
    assert steps_saved(run) == [2, 4]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4

    assert cli(*synthetic(run, steps=6, checkpoint_every=2, log_every=2), "--resume", "--json") == 0
    out = capsys.readouterr().out
    assert printed_json(out)["step"] == 6
    checkpoint = run / "checkpoints" / "step-00000004"
    assert f"sae-fast: resuming {run} from step 4 (checkpoint {checkpoint})" in out
    assert steps_saved(run) == [2, 4, 6]
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl")] == [2, 4, 6]
    assert SparseAutoencoder.load(run / "sae").config()["d_in"] == 16


def test_resume_from_a_named_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=4, checkpoint_every=2)) == 0
    again = tmp_path / "again"
    assert cli(*synthetic(again, steps=4), "--resume", run / "checkpoints" / "step-00000002") == 0
    assert steps_saved(again) == [4]


def _toml(options: dict) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in options.items())


@pytest.mark.parametrize(("suffix", "dump"), [(".json", json.dumps), (".toml", _toml)])
def test_config_file_with_a_flag_overriding_it(tmp_path, suffix, dump):
    run = tmp_path / "run"
    path = tmp_path / f"options{suffix}"
    path.write_text(dump({**SYNTHETIC, "steps": 5, "n_latents": 48, "out_dir": str(run)}))
    assert cli("train", "--config", path, "--steps", 2) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["steps"] == 2  # the flag wins
    assert saved["n_latents"] == 48 and saved["source"] == "synthetic"  # from the file
    assert steps_saved(run) == [2]


def test_train_and_eval_end_with_a_table_and_json_on_request(tmp_path, capsys):
    """A person reads a metric | value table; --json gives a script the same numbers."""
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=2)) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["metric", "value"])
    rows = dict(line.split() for line in lines[header + 1 : -1])
    assert rows["step"] == "2" and 0 < float(rows["fvu"]) < 10 and float(rows["l0"]) <= 4
    assert lines[-1] == f"saved the SAE to {run / 'sae'}"

    assert cli("eval", "--sae", run / "sae", "--tokens", 128, "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert "{" not in text and "feature_density_histogram" not in text
    shown = dict(line.split()[:2] for line in text.splitlines()[1:-1])
    assert cli("eval", "--sae", run / "sae", "--tokens", 128, "--device", "cpu", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["feature_density_histogram"]) > 0
    for name, value in result.items():
        if isinstance(value, float):
            assert float(shown[name]) == pytest.approx(value, rel=1e-3, abs=1e-12), name
        elif isinstance(value, int):
            assert shown[name] == f"{value:,}", name


def test_tables_align_numbers_right_and_text_left():
    rows = [{"hook": "resid_post.0", "fvu": 0.123456, "tokens": 1234567},
            {"hook": "mlp_out.10", "fvu": 12.5, "tokens": 7}]  # fmt: skip
    assert table(rows, ("hook", "fvu", "tokens")).splitlines() == [
        "hook             fvu     tokens",
        "resid_post.0  0.1235  1,234,567",
        "mlp_out.10      12.5          7",
    ]
    assert cell(None) == "-" and cell(True) == "True" and cell(123456.7) == "123,457"


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({**SYNTHETIC, "stepz": 3}))
    assert cli("train", "--config", path) == 2
    line = error_line(capsys.readouterr().err)
    assert "unknown option(s) ['stepz']" in line and str(path) in line


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("train", "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flat = "".join(text.split())  # argparse wraps lines, at hyphens too
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if f.type == "bool":
            assert "--no-" + f.name.replace("_", "-") in text
        shown = "" if f.default is None else f" (default: {f.default})"
        assert "".join(f"{f.metadata['help']}{shown}".split()) in flat, f.name
    assert "(default: None)" not in text  # a derived default is described by the help


@pytest.mark.parametrize("command", ["eval", "drift"])
def test_reading_commands_list_no_training_only_option(capsys, command):
    """eval and drift read an SAE's latents at one hook point: no --hooks, --hook-in or
    --hook-out (their help says "train ..."), and such a flag is refused by name."""
    with pytest.raises(SystemExit):
        cli(command, "--help")
    text = capsys.readouterr().out
    assert "--text" in text and "--hook " in text
    for flag in ("--hooks", "--hook-in", "--hook-out", "--crosscoder", "--model-b", "--layers"):
        assert not re.search(re.escape(flag) + r"\b(?!-)", text), flag  # (--model-batch-size)
    with pytest.raises(SystemExit) as exit_:
        cli(command, "--sae", "x", "--against", "y", "--hook-in", "mlp_in.3")
    assert exit_.value.code == 2
    assert re.search(r"unrecognized arguments: .*--hook-in", capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "many"], "argument --steps: invalid integer value: 'many'"),
        (["--backend", "fast"], "argument --backend: invalid choice: 'fast' (choose from"),
        (["--model-dtype", "half"], "argument --model-dtype: invalid choice: 'half' (choose"),
    ],
)
def test_bad_flag_value_is_an_argparse_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli("train", *argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"sae-fast train: error: {message}")


EVAL = ["eval", "--sae", "{sae}", "--source", "synthetic"]  # {sae}: d_in=16
ERRORS = {
    "missing config file": (["train", "--config", "{tmp}/none.toml"], "none.toml does not exist"),
    "model without hook": (["train", "--model", "{gpt}"], "source=model needs both model and hook"),
    "no run to resume": (
        ["train", "--source", "synthetic", "--out-dir", "{tmp}/run", "--resume"],
        "run holds no run to continue (no config.json)",
    ),
    "unknown device": (["train", "--source", "synthetic", "--device", "gpu"], "device must be"),
    "missing sae folder": (
        ["eval", "--sae", "{tmp}/nowhere", "--source", "synthetic"],
        "nowhere does not exist",
    ),
    "sae width differs": ([*EVAL, "--synthetic-d", "8"], "d_in=8 but the SAE has 16"),
    "no eval tokens": (
        [*EVAL, "--synthetic-d", "16", "--tokens", "0"],
        "tokens must be a positive int",
    ),
    "no eval batch": (  # used to loop forever
        [*EVAL, "--synthetic-d", "16", "--batch-size", "0"],
        "batch_size must be a positive int",
    ),
    "ce without a model": ([*EVAL, "--ce"], "--ce needs source=model"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_exit_2_with_one_line(case, tmp_path, folders, capsys):
    argv, message = ERRORS[case]
    sae = tmp_path / "sae"
    SparseAutoencoder(16, 32, k=4).save(sae)
    paths = {"tmp": tmp_path, "gpt": folders["gpt"], "sae": sae}
    assert cli(*(a.format(**paths) for a in argv)) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"sae-fast {argv[0]}: error: ")
    assert message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs here")
def test_unavailable_backend_exits_2(tmp_path, capsys):
    assert cli(*synthetic(tmp_path / "run", steps=1, backend="cuda", device="cpu")) == 2
    assert "backend 'cuda' (requested) cannot run on cpu" in error_line(capsys.readouterr().err)


def test_hook_point_the_model_lacks(tmp_path, folders, capsys):
    argv = ["train", "--model", folders["gpt"], "--hook", "resid_post.9", "--text", folders["text"]]
    assert cli(*argv, "--out-dir", tmp_path / "run") == 2
    line = error_line(capsys.readouterr().err)
    assert "hook point 'resid_post.9' is not in this GPT2LMHeadModel" in line
    assert "resid_post.0, resid_post.1, mlp_in.0, mlp_in.1, mlp_out.0" in line
    assert not (tmp_path / "run").exists()


def test_train_on_a_model_folder(tmp_path, folders):
    run = tmp_path / "run"
    argv = ["--model", folders["gpt"], "--hook", "resid_post.1", "--text", folders["text"]]
    options = {"n_latents": 64, "k": 4, "steps": 3, "batch_size": 32, "init_tokens": 64}
    options |= {"progress": False, "plots": False, "out_dir": run}
    assert cli("train", *argv, *MODEL_DATA, *flags(**options)) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["source"]["kind"] == "model"
    assert config["source"]["module"] == "transformer.h.1"
    assert config["d_in"] == WIDTH
    assert SparseAutoencoder.load(run / "sae").n_latents == 64


def test_cache_then_train_and_eval_on_it(tmp_path, folders, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    model = ["--model", folders["gpt"], "--text", folders["text"], "--context-size", 32]
    assert cli("cache", *model, "--hook", "resid_post.0", "--out", cache, "--tokens", 300,
               "--shard-rows", 128) == 0  # fmt: skip
    assert f"wrote 300 activations of {folders['gpt']} at resid_post.0" in capsys.readouterr().out
    manifest = read_manifest(cache)
    assert [s["rows"] for s in manifest["shards"]] == [128, 128, 44]
    assert manifest["d_in"] == WIDTH and manifest["hook"] == "resid_post.0"

    options = {"n_latents": 64, "k": 4, "steps": 3, "batch_size": 32, "init_tokens": 64}
    options |= {"progress": False, "plots": False, "out_dir": run}
    assert cli("train", "--source", "cache", "--cache-dir", cache, *flags(**options)) == 0
    assert json.loads((run / "config.json").read_text())["source"]["kind"] == "cache"
    capsys.readouterr()

    report = tmp_path / "eval.json"
    assert cli("eval", "--source", "cache", "--cache-dir", cache, "--sae", run / "sae",
               "--tokens", 200, "--batch-size", 64, "--out", report, "--json") == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(report.read_text())
    assert result["tokens"] == 200
    assert result["l0"] <= 4 and 0 <= result["dead_fraction"] <= 1
    assert result["mse"] > 0 and 0 < result["fvu"] < 10
    # SAEBench's core set, and the latents by log10 firing frequency.
    assert 0 < result["cossim"] <= 1 and result["l2_ratio"] > 0 and result["l1"] > 0
    assert result["frac_alive"] == pytest.approx(1 - result["dead_fraction"])
    histogram = result["feature_density_histogram"]
    assert sum(histogram["counts"]) + histogram["dead"] == 64


def test_cache_reports_the_rows_it_wrote_when_the_text_runs_out(tmp_path, folders, capsys):
    argv = ["cache", "--model", folders["gpt"], "--hook", "resid_post.0", "--text", folders["text"]]
    with pytest.warns(UserWarning, match="ran out"):
        assert cli(*argv, "--out", tmp_path / "cache", "--tokens", 10**6, "--context-size", 32) == 0
    rows = read_manifest(tmp_path / "cache")["rows"]
    assert 0 < rows < 10**6
    assert f"wrote {rows} activations" in capsys.readouterr().out


def test_eval_never_takes_the_training_text_for_held_out_text(tmp_path, folders, capsys):
    sae = identity_sae(WIDTH)
    held = write_corpus(tmp_path / "held.txt", paragraphs=5)
    sae.provenance = {"train": {"source": "model", "model": folders["gpt"],
                                "hook": "resid_post.1", "text": folders["text"]}}  # fmt: skip
    sae.save(tmp_path / "sae")
    base = ["eval", "--sae", tmp_path / "sae", *MODEL_DATA, "--tokens", 64, "--device", "cpu"]
    assert cli(*base) == 2  # the default text might be the training text: refused
    line = error_line(capsys.readouterr().err)
    assert (
        f"--text: give held-out text to evaluate on (this SAE was trained on '{folders['text']}')"
        in line
    )
    assert cli(*base, "--text", folders["text"]) == 0  # the training text: loudly
    assert "is the text this SAE was trained on: these figures are not held out" in (
        capsys.readouterr().err
    )
    assert cli(*base, "--text", held) == 0
    assert "not held out" not in capsys.readouterr().err
    assert (
        cli(
            "eval",
            "--sae",
            tmp_path / "sae",
            "--source",
            "synthetic",
            "--synthetic-d",
            WIDTH,
            "--tokens",
            64,
        )
        == 0
    )  # fmt: skip (no text to hold out)


def test_eval_ce_loss_recovered(tmp_path, folders, capsys):
    """With an SAE that reconstructs exactly, the spliced loss is the clean loss."""
    sae = tmp_path / "sae"
    identity_sae(WIDTH).save(sae)
    model = ["--model", folders["gpt"], "--hook", "resid_post.1", "--text", folders["text"]]
    assert cli("eval", *model, *MODEL_DATA, "--sae", sae, "--tokens", 128, "--ce",
               "--ce-windows", 6, "--json") == 0  # fmt: skip
    result = printed_json(capsys.readouterr().out)
    assert result["fvu"] < 1e-10 and result["ce_tokens"] > 0
    assert result["ce_loss_clean"] <= result["ce_loss_zero_ablated"]
    # Zeroing the last block's output leaves ln_f's zero bias: uniform logits.
    vocab = len(minilm_tokenizer())
    assert result["ce_loss_zero_ablated"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert result["ce_loss_sae"] == pytest.approx(result["ce_loss_clean"], rel=1e-6)
    assert math.isfinite(result["ce_recovered"])
    assert result["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert result["kl_div_with_sae"] < 1e-9 and result["kl_div_score"] == pytest.approx(1.0)
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-9)


def test_eval_ce_refuses_a_model_without_next_token_head(tmp_path, folders, capsys):
    sae = tmp_path / "sae"
    identity_sae(WIDTH).save(sae)
    model = ["--model", folders["bert"], "--hook", "resid_post.1", "--text", folders["text"]]
    assert cli("eval", *model, *MODEL_DATA, "--sae", sae, "--ce") == 2
    line = error_line(capsys.readouterr().err)
    assert "needs a causal language model; BertModel has no language-model head" in line


def test_eval_synthetic_uses_the_runs_dictionary(tmp_path, capsys):
    """--seed picks the run's dictionary: the trained SAE fits it far better than another."""
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=60, seed=7, lr=0.01)) == 0
    data = flags(**{k: v for k, v in SYNTHETIC.items() if k.startswith("s")})
    fvu = {}
    for seed in (7, 0):
        capsys.readouterr()
        assert (
            cli("eval", "--sae", run / "sae", *data, "--tokens", 512, "--seed", seed, "--json") == 0
        )
        fvu[seed] = printed_json(capsys.readouterr().out)["fvu"]
    assert fvu[7] < 0.5 * fvu[0]


def test_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "run_toy", interrupted)
    assert cli("toy", "--out", tmp_path) == 130
    assert capsys.readouterr().err == "sae-fast toy: interrupted\n"
    # The demo catches Ctrl-C during training itself, saves and says so.
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: {"interrupted": True, "steps": 3})
    assert cli("demo", "--out", tmp_path) == 130


def test_console_script_help():
    exe = shutil.which("sae-fast")
    assert exe is not None, "the sae-fast console script is not installed"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "train" in done.stdout and "eval" in done.stdout


def test_module_entry_point_exits_2_on_a_bad_option():
    argv = [sys.executable, "-m", "sae_fast.cli", "train", "--steps", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "sae-fast train: error: steps must be a positive integer, got 0"
