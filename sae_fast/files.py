"""Files and folders that readers can trust: atomic writes, atomic folders, locks, safe reads.

Every file sae_fast writes appears whole (written beside its target, synced, renamed over it)
and with the modes the umask allows, as `open` would give it; a folder of several files (an
SAE, a checkpoint) is written under a hidden name and swapped in whole, so a reader sees the
old folder or the new one, never a mix (`read_stable` makes sure of that on its side). A run
or cache folder is locked while a process writes it; the lock is the kernel's (flock), so a
killed process leaves no lock behind. Reading never blocks on a pipe or device named like a
file and never recurses without bound into a nested JSON document.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
LOCK_FILE = ".lock"
MANIFEST_FILE = ".sae_fast-files.json"  # what atomic_folder wrote: see check_replaceable
# Hidden siblings of a file or folder being written (.NAME.saving~HOST~PID~RANDOM) or removed
# (.NAME.removing~HOST~PID~RANDOM); those of a dead process of this host are left over from a
# kill (a folder shared between machines keeps the others').
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(saving|removing)~(?P<host>[^~]+)~(?P<pid>[0-9]+)~")
_HOST = socket.gethostname().replace("~", "-")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_READ_TRIES = 8


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock."""


def _umask() -> int:
    """The process umask, read without setting it where Linux says it (setting it, even
    for a moment, would race the files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: Path, folder: bool = False) -> None:
    """Give path the mode a plain open()/mkdir() would (tempfile makes them private)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside target; on success fsync it and rename it over target.

    A reader sees the old file or the complete new one, never a partial write; on error the
    temp file is removed and target is untouched.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_prefix(target, "saving"), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        shareable(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as e:  # a full disk, above all: name the file, not the temp
        raise OSError(e.errno, f"cannot write {target}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O errors (a full disk) as OSError, like every
    other write."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = errno.ENOSPC if "os error 28" in str(e) else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else str(e)) from e


def save_torch(obj: object, path: Path) -> None:
    """torch.save through a Python file, so that a full disk is an OSError (ENOSPC), not the
    zip writer's bare assertion: a write that fails part-way surfaces as torch's RuntimeError
    raised while the file's OSError is handled, which is the error to report."""
    import torch

    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            failed = e.__cause__ or e.__context__
            if isinstance(failed, OSError):
                raise OSError(failed.errno, failed.strerror) from None
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(parent: str | Path) -> list[Path]:
    """Remove the scratch files and folders that killed writes of this host left in parent;
    returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        found = _SCRATCH.match(entry.name)
        if found and found["host"] == _HOST and not _alive(int(found["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _prefix(target: Path, what: str) -> str:
    return f".{target.name}.{what}~{_HOST}~{os.getpid()}~"


def _scratch(target: Path, what: str) -> Path:
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target, what)))


def remove_folder(path: str | Path) -> None:
    """Delete folder path so that it is gone at once: renamed to a scratch name, then removed.

    A crash mid-way leaves a hidden scratch folder (which clean_stale removes), never a
    half-deleted folder under its own name.
    """
    path = Path(path)
    trash = _scratch(path, "removing")
    os.rename(path, trash / path.name)
    shutil.rmtree(trash)


def _exchange(a: Path, b: Path) -> bool:
    """Swap a and b in one step (Linux renameat2); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _entries(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to folder, lstat) of everything in folder at every depth but its
    folders; links are not followed (a link is an entry of its own)."""
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for name in names + [d for d in dirs if (base / d).is_symlink()]:
            path = base / name
            yield path.relative_to(folder).as_posix(), os.lstat(path)


def _manifest(folder: Path) -> dict[str, int]:
    """The files atomic_folder wrote in folder (relative path -> size); {} if none is recorded
    or the record is unreadable."""
    try:
        with open(folder / MANIFEST_FILE, "rb") as f:
            files = json.loads(f.read(1 << 24)).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, int)}


def _write_manifest(folder: Path) -> None:
    """Record every file now in folder, if it has subfolders, so that a later save knows them
    for its own (a flat folder's files are known by their names)."""
    if not any(entry.is_dir() for entry in folder.iterdir()):
        return
    files = {rel: st.st_size for rel, st in sorted(_entries(folder)) if stat.S_ISREG(st.st_mode)}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"files": files}, indent=0) + "\n")
    shareable(path)


def check_replaceable(target: str | Path, replaceable: Iterable[str] = ()) -> Path:
    """target, resolved, if atomic_folder may replace it; else FileExistsError.

    A folder is replaceable if every file in it, at every depth, is one a save wrote: a file
    at its top level named in replaceable (names or fnmatch patterns of what a save of the
    same kind writes), or a file in a subfolder listed in the manifest atomic_folder leaves
    in a folder with subfolders (same path and size: a file edited since is kept). Nothing
    else is deleted. A command checks this before long work whose result goes there."""
    target = Path(os.path.realpath(target))  # a link to a folder: replace the folder
    if not target.exists():
        return target
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    patterns, written = tuple(replaceable), _manifest(target)

    def ours(rel: str, st: os.stat_result) -> bool:
        if not stat.S_ISREG(st.st_mode):
            return False
        if rel == MANIFEST_FILE or written.get(rel) == st.st_size:
            return True
        return "/" not in rel and any(fnmatch(rel, p) for p in patterns)

    try:
        foreign = sorted(rel for rel, st in _entries(target) if not ours(rel, st))
    except OSError as e:
        raise FileExistsError(f"{target} cannot be checked before replacing it: {e}") from None
    if foreign:
        raise FileExistsError(
            f"{target} holds files this save would delete ({', '.join(foreign[:8])}"
            f"{', ...' if len(foreign) > 8 else ''}); save into a new or empty folder"
        )
    return target


@contextmanager
def atomic_folder(target: str | Path, replaceable: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty scratch folder beside target; on success it replaces target whole.

    target may be absent or hold only files an earlier save wrote (check_replaceable);
    anything else is refused with FileExistsError rather than deleted. A new folder with
    subfolders records its files in MANIFEST_FILE. Readers see the old folder or the new one
    (swapped by one rename where Linux allows, see read_stable); on error target is untouched
    and the scratch folder removed.
    """
    target = check_replaceable(target, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = _scratch(target, "saving")
    try:
        shareable(tmp, folder=True)
        yield tmp
        _write_manifest(tmp)
        for entry in tmp.rglob("*"):
            if entry.is_file():
                _fsync(entry)
        _fsync(tmp)
        # After either swap tmp holds the old folder (if any), removed below; without them,
        # readers retry over the moment target is absent (read_stable).
        if not (_publish(tmp, target) or _exchange(tmp, target)):
            old = _scratch(target, "removing")
            os.rename(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old)
        _fsync(target.parent)
    except OSError as e:  # a full disk, above all: name the folder, not its scratch copy
        if not e.errno:
            raise
        raise OSError(e.errno, f"cannot write {target}: {os.strerror(e.errno)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> bool:
    """Rename tmp to target where there is no target yet (False: there is one, maybe just
    saved by another process)."""
    if target.exists():
        return False
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _same_folder(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def read_stable(path: str | Path, read: Callable[[], T]) -> T:
    """read() of the folder path, retried while a save replaces it (atomic_folder).

    The folder is held open while read() runs, so its inode cannot be reused: if path names
    the same folder before and after, every file read came from that one version. A file
    path is read once (files are replaced by a single rename).
    """
    path = Path(path)
    for attempt in range(_READ_TRIES):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except NotADirectoryError:
            return read()
        except FileNotFoundError:  # between the two renames of a save without renameat2
            if attempt == _READ_TRIES - 1:
                return read()  # says what is missing
            time.sleep(0.01)
            continue
        try:
            try:
                result = read()
            except Exception:
                if _same_folder(path, fd):
                    raise
                continue
            if _same_folder(path, fd):
                return result
        finally:
            os.close(fd)
    raise FileExistsError(f"{path} was replaced {_READ_TRIES} times while being read; try again")


def check_regular(path: Path, error: type[Exception]) -> None:
    """Raise error unless path is a regular file (a pipe or device would block a read)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except PermissionError:
        raise error(f"{path} cannot be read: permission denied") from None
    except OSError as e:  # a file where a folder should be, a loop of links
        raise error(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file")


def read_failure(path: Path, e: Exception) -> str:
    """Why a reader (safetensors, torch.load) failed on the file at path: the system's reason
    if the file cannot be opened (safetensors calls a permission error "No such file"), else
    its contents."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return f"{path} cannot be read: permission denied"
    except OSError as opened:
        return f"{path} cannot be read: {opened.strerror or opened}"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"{path} cannot be read: {e.strerror or e}"
    return f"{path} is truncated or corrupt: {e}"


def read_text(path: str | Path, error: type[Exception]) -> str:
    """The UTF-8 text of the regular file at path; anything else raises error naming path."""
    path = Path(path)
    check_regular(path, error)
    try:
        # O_NONBLOCK: a file swapped for a pipe after the check still cannot hang the read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{path} is not a regular file")
            data = f.read()
    except PermissionError:
        raise error(f"{path} cannot be read: permission denied") from None
    except OSError as e:
        raise error(f"{path} cannot be read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text: {e}") from None


def parse_json(text: str, where: str, error: type[Exception]) -> Any:
    """json.loads(text); malformed or absurdly nested documents raise error naming where."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to be a config") from None


def read_json(path: str | Path, error: type[Exception]) -> Any:
    """The JSON document in the regular file at path (see read_text and parse_json)."""
    return parse_json(read_text(path, error), str(path), error)


def peek_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in the file at path; None when it is absent, unreadable or not one."""
    try:
        body = read_json(path, ValueError)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@contextmanager
def lock_folder(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold folder's lock (folder/.lock) for the with-block; FolderInUseError if taken.

    The kernel releases the lock when its process ends, however it ends, so a killed run
    never blocks the next one; the file says who holds it, for the message.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise FolderInUseError(
                f"{folder} is in use by another {what} ({holder}); wait for it to finish or "
                "use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)


def check_unlocked(folder: str | Path, what: str) -> None:
    """FolderInUseError if another process holds folder's lock (lock_folder): a check before
    slow work (a model to load), which then takes the lock itself."""
    if (Path(folder) / LOCK_FILE).exists():
        with lock_folder(folder, what):
            pass
