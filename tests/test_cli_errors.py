"""The command line without tracebacks: bad values, damaged or odd files, full disks, locked
folders; --resume alone, run configs, provenance defaults; help, version, typos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_cli import SYNTHETIC, cli, error_line, flags, printed_json, steps_saved, synthetic

import sae_fast
from sae_fast import SparseAutoencoder, files
from sae_fast.checkpoint import CheckpointError
from sae_fast.cli import build_parser
from sae_fast.sources import minilm_path, model_location, read_manifest, write_cache
from sae_fast.training import checkpoints

BAD_VALUES = {
    "beta1 of 2": (["--adam-beta1", "2"], "adam_beta1 must be in [0, 1), got 2.0"),
    "beta2 nan": (["--adam-beta2", "nan"], "adam_beta2 must be in [0, 1), got nan"),
    "negative eps": (["--adam-eps", "-1"], "adam_eps must be a finite number > 0, got -1.0"),
    "zero bandwidth": (["--jumprelu-bandwidth", "0"], "jumprelu_bandwidth must be a finite"),
    "infinite lr": (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    "huge dictionary": (["--n-latents", str(10**20)], "n_latents=100000000000000000000 x d_in"),
    "huge width": (["--synthetic-d", str(10**12)], "d_in=1000000000000 needs"),
}


# Digits of other scripts and superscripts: int() takes '\u0663' (Arabic-Indic three) and
# str.isdigit() '\u00b2' (superscript two); every option reads ASCII digits only.
NOT_ASCII_NUMBERS = {
    "steps": (["--steps", "\u0663"], "--steps: invalid integer value: '\u0663'"),
    "superscript steps": (["--steps", "\u00b2"], "--steps: invalid integer value"),
    "full-width k": (["--k", "\uff18"], "--k: invalid integer value"),
    "lr": (["--lr", "\u0661e-3"], "--lr: invalid decimal value"),
    "matryoshka": (["--matryoshka", "\u0668,16"], "matryoshka"),
    "device": (["--device", "cuda:\u0660"], "device must be auto, cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("case", NOT_ASCII_NUMBERS)
def test_numbers_in_other_scripts_are_refused_by_option(case, tmp_path, capsys):
    argv, message = NOT_ASCII_NUMBERS[case]
    try:
        code = cli(*synthetic(tmp_path / "run", steps=2), *argv)
    except SystemExit as e:  # argparse's own refusal of a --flag's type
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_exit_2_with_one_line_naming_the_option(case, tmp_path, capsys):
    argv, message = BAD_VALUES[case]
    assert cli(*synthetic(tmp_path / "run", steps=2), *argv) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("sae-fast train: error: ") and message in line


def test_a_config_nested_thousands_deep(tmp_path, capsys):
    deep = {"deep.json": "[" * 50_000 + "]" * 50_000, "deep.toml": "a = " + "[" * 50_000}
    for name, text in deep.items():
        (tmp_path / name).write_text(text)
        assert cli("train", "--config", tmp_path / name) == 2
        line = error_line(capsys.readouterr().err)
        assert name in line and ("nested too deeply" in line or "does not parse" in line)


def test_a_cfg_json_with_an_integer_dtype(tmp_path, capsys):
    SparseAutoencoder(16, 32, k=4).save(tmp_path / "sae")
    cfg = tmp_path / "sae" / "cfg.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "dtype": "int64"}))
    assert cli("inspect", tmp_path / "sae") == 2
    assert "dtype must name a floating-point torch dtype, got 'int64'" in error_line(
        capsys.readouterr().err
    )


def test_a_cfg_json_that_is_a_named_pipe_does_not_hang(tmp_path, capsys):
    SparseAutoencoder(16, 32, k=4).save(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").unlink()
    os.mkfifo(tmp_path / "sae" / "cfg.json")
    done = subprocess.run(
        [sys.executable, "-m", "sae_fast", "inspect", str(tmp_path / "sae")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "cfg.json is not a regular file" in done.stderr


def test_an_unreadable_folder_says_so(tmp_path, capsys, monkeypatch):
    SparseAutoencoder(16, 32, k=4).save(tmp_path / "sae")
    real = os.access

    def access(path, mode):  # as for another user's folder without read permission
        return False if Path(path).name == "sae" else real(path, mode)

    monkeypatch.setattr(os, "access", access)
    assert cli("inspect", tmp_path / "sae") == 2
    assert "sae cannot be read: permission denied" in error_line(capsys.readouterr().err)


_LOAD_UNPRIVILEGED = """
import sys
from sae_fast import SparseAutoencoder
from sae_fast.checkpoint import CheckpointError
try:
    SparseAutoencoder.load(sys.argv[1])
except CheckpointError as e:
    print(e)
"""


def test_a_weights_file_the_user_may_not_read_is_not_called_corrupt(tmp_path):
    """A real permission error: the load runs as root without the capabilities that let root
    read any file, on a file whose mode is 0 (the interpreter and its packages stay readable
    wherever they are installed, which a switch to another user does not promise)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop root's file-reading capabilities")
    SparseAutoencoder(16, 32, k=4).save(tmp_path / "sae")
    os.chmod(tmp_path / "sae" / "sae.safetensors", 0)
    root = str(Path(sae_fast.__file__).parents[1])
    command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
               sys.executable, "-c", _LOAD_UNPRIVILEGED, str(tmp_path / "sae")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    assert done.stdout.strip().endswith("sae.safetensors cannot be read: permission denied"), done
    assert "corrupt" not in done.stdout, done.stderr


def test_a_folder_that_is_a_link_to_itself(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(CheckpointError, match="loop cannot be read: Too many levels of symbolic"):
        SparseAutoencoder.load(tmp_path / "loop")
    assert cli("inspect", tmp_path / "loop") == 2
    assert "Too many levels of symbolic links" in error_line(capsys.readouterr().err)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert cli("eval", "--sae", tmp_path / "a", "--source", "synthetic") == 2
    assert "Too many levels of symbolic links" in error_line(capsys.readouterr().err)


def _cache(folder: Path, rows: int = 256, **meta) -> Path:
    chunks = [torch.randn(64, 16) for _ in range(rows // 64)]
    return write_cache(folder, chunks, tokens=rows, shard_rows=128, meta=meta)


def test_a_truncated_cache_shard(tmp_path, capsys):
    cache = _cache(tmp_path / "cache")
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    argv = flags(
        **{**SYNTHETIC, "out_dir": tmp_path / "run", "source": "cache", "cache_dir": cache}
    )
    assert cli("train", *argv, "--steps", "2") == 2
    assert "shard-00001.safetensors is truncated, corrupt" in error_line(capsys.readouterr().err)


def test_a_cache_manifest_must_match_its_shards_dtype(tmp_path, capsys):
    cache = _cache(tmp_path / "cache")
    manifest = cache / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "dtype": "float16"}))
    argv = flags(
        **{**SYNTHETIC, "out_dir": tmp_path / "run", "source": "cache", "cache_dir": cache}
    )
    assert cli("train", *argv, "--steps", "2") == 2
    assert "holds F32 activations but the manifest says float16" in error_line(
        capsys.readouterr().err
    )


def test_resume_on_a_cache_rebuilt_from_another_hook_is_refused(tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    _cache(cache, hook="resid_post.1", model="gpt")
    argv = flags(**{**SYNTHETIC, "out_dir": run, "source": "cache", "cache_dir": cache})
    assert cli("train", *argv, "--steps", "2") == 0
    for f in cache.iterdir():
        f.unlink()
    torch.manual_seed(0)
    _cache(cache, hook="resid_post.2", model="gpt")  # same shapes, another layer
    assert cli("train", *argv, "--steps", "4", "--resume") == 2
    line = error_line(capsys.readouterr().err)
    assert "hook: 'resid_post.1' != 'resid_post.2'" in line


def test_a_full_disk_while_training(tmp_path, capsys, monkeypatch):
    assert Path("/dev/full").is_char_device()

    def to_a_full_disk(obj, path):  # a real ENOSPC from torch.save, through /dev/full
        files.save_torch(obj, Path("/dev/full"))

    monkeypatch.setattr(checkpoints, "save_torch", to_a_full_disk)
    assert cli(*synthetic(tmp_path / "run", steps=4, checkpoint_every=2)) == 2
    line = error_line(capsys.readouterr().err)
    assert line.endswith(
        "cannot write "
        + str(tmp_path / "run" / "checkpoints" / "step-00000002")
        + ": No space left on device"
    )  # the folder, not its scratch copy
    assert steps_saved(tmp_path / "run") == []


def mount_tmpfs(folder: Path, size: str) -> bool:
    """Whether a tmpfs of size (e.g. 64k) could be mounted on folder (made here)."""
    folder.mkdir()
    try:
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:  # no mount command
        return False


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """fill() -> a folder on a full disk: a 64 KiB tmpfs where mounting one is allowed (a real
    ENOSPC), else safetensors made to fail as it does on one (its message, os error 28)."""
    mount = tmp_path / "full"
    mounted = mount_tmpfs(mount, "64k")

    def fill() -> Path:
        if not mounted:
            import safetensors.torch

            def no_space(*args, **kw):
                message = "Error while serializing: I/O error: No space left on device"
                raise SafetensorError(f"{message} (os error 28)")

            monkeypatch.setattr(safetensors.torch, "save_file", no_space)
        return mount

    yield fill
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_saving(tmp_path, capsys, full_disk):
    SparseAutoencoder(64, 512, k=4).save(tmp_path / "sae")  # 256 KiB: more than the disk holds
    full = full_disk()
    assert cli("convert", tmp_path / "sae", full / "copy", "--to", "sae_fast") == 2
    assert "No space left on device" in error_line(capsys.readouterr().err)
    assert not (full / "copy").exists()


def test_a_disk_that_fills_part_way_through_a_checkpoint(tmp_path, capsys):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):  # CI's machine mounts one; other machines may not
        pytest.skip("this machine does not let the tests mount a tmpfs")
    try:
        run = disk / "run"  # a checkpoint is ~600 KB: the second one fills the disk
        argv = synthetic(run, steps=6, checkpoint_every=2, keep_checkpoints=5, n_latents=1536)
        assert cli(*argv) == 2
        line = error_line(capsys.readouterr().err)
        assert line.startswith("sae-fast train: error: cannot write ")
        assert line.endswith("No space left on device")
        assert steps_saved(run) == [2]  # the checkpoint already on disk stays good
        kept = tmp_path / "kept"
        shutil.copytree(run, kept)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert cli("train", "--resume", "--out-dir", kept) == 0
    assert steps_saved(kept) == [2, 4, 6]


def test_two_caches_on_one_folder(tmp_path, capsys):
    hold = "import sys, time\nfrom sae_fast.files import lock_folder\nwith lock_folder(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(60)\n"  # noqa: E501
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["cache", "--model", "minilm", "--hook", "resid_post.0", "--tokens", "64"]
        assert cli(*argv, "--out", tmp_path / "cache") == 2
        line = error_line(capsys.readouterr().err)
        assert f"is in use by another sae-fast cache writing (pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()


def test_cache_checks_its_text_folder_and_sizes_before_the_model(tmp_path, capsys):
    """Each mistake is named though --model names no model: nothing was loaded before."""
    held = tmp_path / "held"
    write_cache(held, [torch.randn(8, 4)], tokens=8)
    argv = ["cache", "--model", tmp_path / "no-model", "--hook", "resid_post.0", "--tokens", 64]
    cases = [
        (["--text", tmp_path / "missing.txt", "--out", tmp_path / "c"], "--text: "),
        (["--out", held], "already holds an activation cache"),
        (["--out", tmp_path / "c", "--shard-rows", "-1"], "--shard-rows"),
        (["--out", tmp_path / "c", "--context-size", "0"], "--context-size"),
    ]
    for extra, message in cases:
        assert cli(*argv, *extra) == 2, extra
        line = error_line(capsys.readouterr().err)
        assert message in line and "no-model" not in line, line


def test_resume_alone_continues_a_run_from_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=4, checkpoint_every=2)) == 0
    capsys.readouterr()
    assert cli("train", "--resume", "--out-dir", run, "--steps", 6, "--json") == 0
    out = capsys.readouterr().out
    assert printed_json(out)["step"] == 6 and "resuming with steps=6" in out
    assert steps_saved(run) == [2, 4, 6]  # checkpoint_every=2 from the run's config.json


def test_a_runs_config_json_is_a_config_file(tmp_path):
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=2, n_latents=48)) == 0
    again = tmp_path / "again"
    assert cli("train", "--config", run / "config.json", "--out-dir", again) == 0
    saved = json.loads((again / "config.json").read_text())["train"]
    assert saved["n_latents"] == 48 and saved["out_dir"] == str(again)


def test_eval_takes_the_data_options_from_the_sae_and_warns_on_another_hook(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=2)) == 0
    capsys.readouterr()
    assert cli("eval", "--sae", run / "sae", "--tokens", 128, "--device", "cpu", "--json") == 0
    assert printed_json(capsys.readouterr().out)["fvu"] > 0  # synthetic d=16 from provenance
    sae = SparseAutoencoder.load(run / "sae")
    sae.provenance = {"model": "gpt", "hook": "resid_post.1"}  # as an SAELens export says
    sae.save(tmp_path / "lens", format="saelens")
    from sae_fast.cli import recorded_data_options

    loaded = SparseAutoencoder.load(tmp_path / "lens")
    options = recorded_data_options(loaded.provenance, {"hook": "resid_post.0"})
    assert options == {"source": "model", "model": "gpt", "hook": "resid_post.0"}
    assert "trained with hook='resid_post.1', not 'resid_post.0'" in capsys.readouterr().err


def test_help_version_abbreviations_and_typos(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("--version")
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("sae-fast 0.")
    for argv, expected in [
        (["train", "--step", "3"], "unrecognized arguments: --step (did you mean --steps?)"),
        (["eval", "--sae", "x", "--tokns", "3"], "unrecognized arguments: --tokns (did you"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli(*argv)
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and expected in err[-1]  # the hint is the last line
        # after a one-line usage of the subcommand
        assert err == [f"usage: sae-fast {argv[0]} [options] (--help lists them)", err[-1]]
    with pytest.raises(SystemExit):
        cli("compare", "a")  # a positional missing: the usage names them
    assert capsys.readouterr().err.splitlines() == [
        "usage: sae-fast compare a b [options] (--help lists them)",
        "sae-fast compare: error: the following arguments are required: b",
    ]
    parser = build_parser()
    assert parser.parse_args(["eval", "--sae", "x"]).device == "auto"
    assert (
        parser.parse_args(
            ["cache", "--model", "m", "--hook", "h", "--out", "o", "--tokens", "1"]
        ).device
        == "auto"
    )
    for command in ("demo", "eval", "cache", "report"):
        with pytest.raises(SystemExit):
            cli(command, "--help")
        assert "(default: " in capsys.readouterr().out, command


def test_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom sae_fast.cli import build_parser\n"
        "build_parser().format_help()\nprint(sorted(m for m in sys.modules if m == 'torch'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_models_by_name_and_missing_folders(tmp_path, capsys):
    assert model_location("minilm") == minilm_path()
    argv = ["cache", "--hook", "resid_post.0", "--tokens", "8", "--out", tmp_path / "c"]
    assert cli(*argv, "--model", "./no/such/model") == 2
    assert "model folder no/such/model does not exist" in error_line(capsys.readouterr().err)
    assert cli(*argv, "--model", "minilm", "--device", "cpu") == 0
    assert "wrote 8 activations of minilm" in capsys.readouterr().out
    assert read_manifest(tmp_path / "c")["model"] == "minilm"  # not this venv's path


def test_a_shard_damaged_while_training_is_a_source_error(tmp_path):
    from sae_fast.sources import CacheSource, SourceError

    cache = _cache(tmp_path / "cache")
    source = CacheSource(cache)  # the manifest and shard headers are checked here
    source.next_batch(8)
    for shard in cache.glob("shard-*"):
        shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(SourceError, match=r"shard-0000\d.safetensors is truncated or corrupt"):
        for _ in range(64):
            source.next_batch(64)


def test_report_and_the_example_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=2)) == 0
    assert cli("report", run) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    assert cli("report", tmp_path / "nothing") == 2
    example = Path(__file__).resolve().parents[1] / "examples" / "run.toml"
    short = ["--steps", 2, "--batch-size", 64, "--n-latents", 768, "--init-tokens", 64]
    assert (
        cli("train", "--config", example, *short, "--out-dir", tmp_path / "ex", "--no-progress")
        == 0
    )
    saved = json.loads((tmp_path / "ex" / "config.json").read_text())
    assert saved["train"]["model"] == "minilm" and saved["source"]["d_in"] == 384


def test_a_copied_checkpoint_resumes_only_into_a_run_folder_of_its_own(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert cli(*synthetic(run, steps=4, checkpoint_every=2)) == 0
    copy = tmp_path / "elsewhere" / "ck2"
    shutil.copytree(run / "checkpoints" / "step-00000002", copy)
    capsys.readouterr()
    assert cli("train", "--resume", copy) == 2  # its recorded out_dir is the original run's
    assert "is not in a run folder; give --out-dir" in error_line(capsys.readouterr().err)
    assert cli("train", "--resume", copy, "--out-dir", tmp_path / "branch") == 0
    assert steps_saved(tmp_path / "branch") == [4] and steps_saved(run) == [2, 4]


def test_an_old_checkpoint_of_a_cache_still_resumes(tmp_path):
    from sae_fast.sources import CacheSource

    source = CacheSource(_cache(tmp_path / "cache"))
    source.next_batch(40)
    state = source.state_dict()
    shards = [{k: s[k] for k in ("file", "rows")} for s in source.shards]  # no sha256 then
    state["identity"] = {"rows": 256, "d_in": 16, "shards": shards, "seed": 0,
                         "dtype": "torch.float32"}  # fmt: skip
    again = CacheSource(tmp_path / "cache")
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(8), source.next_batch(8))


def test_an_allocation_that_does_not_fit_is_one_line(tmp_path, capsys, monkeypatch):
    def too_big(self, n):  # torch's own allocator refusing 25 TB
        return torch.empty(10**11, 64)

    monkeypatch.setattr("sae_fast.sources.synthetic.SyntheticSource.next_batch", too_big)
    assert cli(*synthetic(tmp_path / "run", steps=2)) == 2
    line = error_line(capsys.readouterr().err)
    assert "out of memory (" in line and "can't allocate memory" in line


def test_train_checks_its_text_and_folder_before_loading_a_model(tmp_path, capsys):
    """A model that does not exist would be the error if it were loaded first."""
    nowhere = ["--model", str(tmp_path / "no-model"), "--hook", "resid_post.0"]
    run = tmp_path / "run"
    assert cli("train", *nowhere, "--text", tmp_path / "missing.txt", "--out-dir", run) == 2
    assert "--text: " in error_line(capsys.readouterr().err)
    assert not run.exists()  # nothing made on the way to the refusal
    assert cli(*synthetic(run, steps=2)) == 0
    capsys.readouterr()
    assert cli("train", *nowhere, "--out-dir", run) == 2
    assert "already holds checkpoints" in error_line(capsys.readouterr().err)
    other = tmp_path / "other"
    with files.lock_folder(other, "test holder"):
        assert cli("train", *nowhere, "--out-dir", other) == 2
    assert "is in use by another sae-fast training run" in error_line(capsys.readouterr().err)
