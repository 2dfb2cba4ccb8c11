"""sae_fast.files: whole-folder saves, readers that never see a mix, modes, locks, safe reads."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from sae_fast import SparseAutoencoder, files
from sae_fast.checkpoint import CheckpointError


def _sae(fill: float, k: int) -> SparseAutoencoder:
    """An SAE whose weights (all `fill`) say which save they came from, as its k does."""
    sae = SparseAutoencoder(8, 16, k=k)
    with torch.no_grad():
        for p in sae.parameters():
            p.fill_(fill)
    return sae


def _save_forever(path: str, stop) -> None:
    saes = [_sae(1.0, 2), _sae(2.0, 4)]
    i = 0
    while not stop.is_set():
        saes[i % 2].save(path)
        i += 1


def test_a_reader_never_sees_one_save_mixed_with_another(tmp_path):
    path = tmp_path / "sae"
    _sae(1.0, 2).save(path)
    stop = mp.get_context("spawn").Event()
    writer = mp.get_context("spawn").Process(target=_save_forever, args=(str(path), stop))
    writer.start()
    try:
        seen = set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and (len(seen) < 2 or time.monotonic() < deadline - 3):
            sae = SparseAutoencoder.load(path)
            fill = sae.W_enc[0, 0].item()
            assert (fill, sae.k) in ((1.0, 2), (2.0, 4)), f"weights of {fill} with k={sae.k}"
            seen.add(sae.k)
        assert seen == {2, 4}, "the writer never replaced the folder while it was read"
    finally:
        stop.set()
        writer.join(10)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_save_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    path = tmp_path / "sae"
    _sae(1.0, 2).save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = json.dumps

    def disk_full(*args, **kw):  # the weights are written, then the config fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _sae(2.0, 4).save(path)
    monkeypatch.setattr(json, "dumps", real)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no scratch folder left


def test_a_save_replaces_only_a_folder_of_sae_files(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"would delete \(todo.txt\)"):
        _sae(1.0, 2).save(notes)
    assert (notes / "todo.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    _sae(1.0, 2).save(empty)
    _sae(2.0, 4).save(empty, format="saelens")  # another format's SAE files may be replaced
    assert sorted(p.name for p in empty.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def _saved(folder) -> None:
    """A folder as atomic_folder leaves it: files at two depths and their manifest."""
    with files.atomic_folder(folder) as tmp:
        (tmp / "index.html").write_text("<html>")
        (tmp / "features").mkdir()
        (tmp / "features" / "0.html").write_text("page")


def _user_edits(folder):
    """What a user may have put in or changed in a saved folder; each must stop a save."""
    yield "a file in a subfolder", lambda: (folder / "features" / "notes.md").write_text("x")
    yield (
        "a new subfolder",
        lambda: (
            (folder / "mine" / "deep").mkdir(parents=True)
            or (folder / "mine" / "deep" / "a.txt").write_text("x")
        ),
    )
    yield "an edited page", lambda: (folder / "features" / "0.html").write_text("my notes")
    yield "a top-level file", lambda: (folder / "data.js").write_text("x")
    yield "a link", lambda: (folder / "features" / "link").symlink_to(folder / "index.html")
    yield "a link to a folder", lambda: (folder / "out").symlink_to(folder.parent)
    yield "a fifo", lambda: os.mkfifo(folder / "features" / "pipe")
    yield (
        "a damaged manifest",
        lambda: (
            (folder / "features" / "x.md").write_text("mine"),
            (folder / files.MANIFEST_FILE).write_text("not json"),
        ),
    )


def test_a_folder_is_replaced_only_if_every_file_at_every_depth_is_a_saves(tmp_path):
    folder = tmp_path / "dash"
    _saved(folder)
    _saved(folder)  # its own files, at every depth: replaced
    assert sorted(p.name for p in (folder / "features").iterdir()) == ["0.html"]
    for what, edit in _user_edits(folder):
        shutil.rmtree(folder)
        _saved(folder)
        edit()
        before = sorted((p.relative_to(folder), p.is_file() and p.read_bytes()) for p in
                        folder.rglob("*") if not p.is_symlink() and not p.is_fifo())  # fmt: skip
        with pytest.raises(FileExistsError, match="would delete"):
            _saved(folder)
        after = sorted((p.relative_to(folder), p.is_file() and p.read_bytes()) for p in
                       folder.rglob("*") if not p.is_symlink() and not p.is_fifo())  # fmt: skip
        assert after == before, what
    assert [p.name for p in tmp_path.iterdir()] == ["dash"]  # no scratch folder left


def test_a_folder_saved_before_manifests_is_replaced_by_its_top_level_names(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.html").write_text("x")
    with files.atomic_folder(old, ["*.html"]) as tmp:
        (tmp / "index.html").write_text("new")
    assert (old / "index.html").read_text() == "new"
    old_nested = tmp_path / "old_nested"
    (old_nested / "features").mkdir(parents=True)
    (old_nested / "features" / "0.html").write_text("x")  # a pattern never reaches down
    with pytest.raises(FileExistsError, match=r"features/0.html"):
        files.check_replaceable(old_nested, ["*.html", "features", "features/*"])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("fmt", ["sae_fast", "saelens", "sparsify", "dictionary_learning"])
def test_saved_files_have_the_modes_the_umask_gives(tmp_path, umask, fmt):
    old = os.umask(umask)
    try:
        _sae(1.0, 2).save(tmp_path / "sae", format=fmt)
    finally:
        os.umask(old)
    folder = tmp_path / "sae"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_scratch_of_a_killed_save_is_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    host = socket.gethostname()
    stale = tmp_path / f".sae.saving~{host}~{dead}~x1y2"  # a killed folder save
    stale.mkdir()
    (stale / "sae.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".cfg.json.saving~{host}~{dead}~abcd.tmp"  # a killed file write
    stale_file.write_text("{")
    live = tmp_path / f".sae.saving~{host}~{os.getpid()}~a1b2"  # a save under way here
    live.mkdir()
    elsewhere = tmp_path / f".sae.saving~another-host~{dead}~c3d4"  # its pid means nothing here
    elsewhere.mkdir()
    _sae(1.0, 2).save(tmp_path / "sae")
    assert not stale.exists() and not stale_file.exists()
    assert live.exists() and elsewhere.exists()


def test_remove_folder_leaves_no_half_deleted_folder_under_its_name(tmp_path, monkeypatch):
    victim = tmp_path / "step-00000002"
    victim.mkdir()
    (victim / "a").write_text("x")
    real = files.shutil.rmtree

    def crash(path, *a, **kw):
        raise KeyboardInterrupt  # killed mid-deletion

    monkeypatch.setattr(files.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        files.remove_folder(victim)
    monkeypatch.setattr(files.shutil, "rmtree", real)
    assert not victim.exists()
    assert [p.name.startswith(".step-00000002.removing~") for p in tmp_path.iterdir()] == [True]


def test_reading_a_named_pipe_fails_at_once(tmp_path):
    folder = tmp_path / "sae"
    _sae(1.0, 2).save(folder)
    (folder / "cfg.json").unlink()
    os.mkfifo(folder / "cfg.json")
    result = {}
    reader = threading.Thread(target=lambda: result.update(error=_load_error(folder)))
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "the loader blocked on a named pipe"
    assert "is not a regular file" in result["error"]


def _load_error(folder) -> str:
    try:
        SparseAutoencoder.load(folder)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_deeply_nested_json_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{path} is nested too deeply"):
        files.read_json(path, ValueError)


def test_a_file_where_a_folder_should_be_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "a file").write_text("")
    path = tmp_path / "a file" / "cfg.json"
    with pytest.raises(ValueError, match=f"{path} cannot be read: Not a directory"):
        files.read_json(path, ValueError)
    assert files.peek_json(path) is None


_HOLD = """
import sys, time
from sae_fast.files import lock_folder
with lock_folder(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_folder_lock_excludes_others_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(files.FolderInUseError, match=f"pid {holder.pid}"),
            files.lock_folder(tmp_path, "test"),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with files.lock_folder(tmp_path, "test"):  # the kernel dropped the killed holder's lock
        pass


def test_run_folders_and_caches_respect_the_umask(tmp_path):
    from sae_fast.sources import SyntheticSource, write_cache
    from sae_fast.training import TrainConfig, Trainer

    old = os.umask(0o002)
    try:
        cfg = TrainConfig(source="synthetic", synthetic_d=16, n_latents=32, k=4, steps=2,
                          batch_size=32, init_tokens=32, out_dir=str(tmp_path / "run"),
                          progress=False, tensorboard=True)  # fmt: skip
        Trainer(cfg, SyntheticSource(16, 32, 3)).train()
        write_cache(tmp_path / "cache", [torch.randn(8, 4)], tokens=8)
    finally:
        os.umask(old)
    found = [p for p in tmp_path.rglob("*")]
    assert len(found) > 12
    for p in found:
        want = 0o775 if p.is_dir() else 0o664
        assert stat.S_IMODE(p.stat().st_mode) == want, p.relative_to(tmp_path)
