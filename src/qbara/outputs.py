"""Where qbara writes: one rule for every output, checked before any work starts (docs/safety.md). An output may
not be or contain an input or the working folder, nor be a non-empty folder qbara did not write (manifest
`.qbara-output.json`; a GGUF's `general.quantized_by`) unless `overwrite`; foreign files are carried over or kept
in `qbara-replaced/`. Folders are swapped in by renames under a lock `.NAME.qbara-lock` that journals temporaries."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError

import qbara.atomic as atomic
from qbara.atomic import current_umask, write_json_atomic
from qbara.errors import QbaraError
from qbara.validate import gguf_reader, read_json_file

__all__ = ["GGUF_MARK", "OutputLock", "check_output", "foreign_files", "mark_folder", "output_file", "output_folder",
           "output_lock", "write_faults_as_errors"]

_MANIFEST = ".qbara-output.json"
REPLACED = "qbara-replaced"
GGUF_MARK = "qbara"  # general.quantized_by in the GGUF files qbara writes


class _FileSystem:
    """The filesystem calls an output swap makes; a test replaces them to fail at each step."""

    rename = staticmethod(os.replace)
    rmtree = staticmethod(shutil.rmtree)
    link = staticmethod(os.link)
    copy = staticmethod(shutil.copy2)
    makedirs = staticmethod(os.makedirs)
    symlink = staticmethod(os.symlink)


fs = _FileSystem()


def _notice(message: str) -> None:
    print(f"qbara: {message}", file=sys.stderr)


# ---------------------------------------------------------------- checks


def _resolved(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(path, inputs: Iterable = (), *, overwrite: bool = False, kind: str = "folder",
                 option: str = "--out") -> Path:
    """Refuse an output that would destroy an input or a user's files; returns the absolute path.
    inputs: paths the command reads (non-paths like 'smollm2-135m' skipped). kind: 'folder' or 'file'."""
    if path is None or str(path).strip() == "":
        raise QbaraError(f"{option} is empty; name the output {kind}")
    out = _resolved(path)
    cwd = _resolved(os.getcwd())
    if _contains(out, cwd):
        raise QbaraError(f"{option} {str(path)!r} is the working folder or contains it; replacing it would "
                         f"delete your files: name a new {kind} (e.g. {option} out/{kind})")
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = Path(str(item)).expanduser()
        if not source.exists():
            continue
        if _contains(out, _resolved(source)) or _contains(out, Path(os.path.realpath(source))):
            raise QbaraError(f"{option} {str(path)!r} is or contains the input {str(item)!r}; writing there would "
                             f"destroy it: choose another {option}")
    _check_writable(out, str(path), option)
    if kind == "folder":
        if out.exists() and not out.is_dir():
            raise QbaraError(f"{option} {str(path)!r} exists and is a file; name a folder")
        if out.is_dir() and any(out.iterdir()) and not _written_by_qbara(out) and not overwrite:
            raise QbaraError(f"{option} {str(path)!r} is not empty and was not written by qbara; choose a new "
                             f"folder, or pass --overwrite to write into it (your files there are kept)")
    else:
        if out.is_dir():
            raise QbaraError(f"{option} {str(path)!r} is a folder; name a file")
        if out.exists() and not overwrite and not _qbara_gguf(out):
            raise QbaraError(f"{option} {str(path)!r} exists and was not written by qbara; choose a new file "
                             f"name, or pass --overwrite to replace it")
    return out


def _check_writable(out: Path, given: str, option: str) -> None:
    """Refuse an output under a file or in a folder this process cannot write into."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QbaraError(f"{option} {given!r}: {parent} is a file, not a folder; choose an output under a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        where = out if out.exists() and not os.access(out, os.W_OK) else parent
        raise QbaraError(f"{option} {given!r}: {where} is not writable (read-only or not yours); choose an output "
                         f"in a folder you can write")


# Disk full, file too large (ulimit -f), read-only filesystem, quota, permission, device error.
# None: a short write reported without an errno (numpy's tofile when the size limit cuts it).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO, None}


def _write_error(err: OSError, out) -> QbaraError:
    """One line for a write fault on `out`: the path, the cause, and that the previous output is kept."""
    path = err.filename or out
    cause = err.strerror or str(err)
    return QbaraError(f"cannot write {path} ({cause}); the previous output at {out} is kept: free space or "
                      f"raise the limit and run again")


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an I/O error
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")  # torch's zip writer when a write stops short


def _write_failure(err: BaseException, out) -> QbaraError | None:
    """The `_write_error` for `err` when it is a write fault (an OSError in _WRITE_ERRNOS, a SafetensorError
    wrapping one, torch.save stopping short), else None."""
    if isinstance(err, OSError):
        return _write_error(err, out) if err.errno in _WRITE_ERRNOS else None
    text = str(err)
    if isinstance(err, SafetensorError):
        match = _OS_ERROR.search(text)
        code = int(match.group(1)) if match else -1
        return _write_error(OSError(code, os.strerror(code)), out) if code in _WRITE_ERRNOS else None
    if isinstance(err, RuntimeError) and "inline_container" in text and any(s in text for s in _TORCH_SHORT_WRITE):
        return _write_error(OSError(None, "torch's writer stopped short: disk full or file size limit"), out)
    return None


@contextlib.contextmanager
def write_faults_as_errors(out) -> Iterator[None]:
    """Raise a write fault inside as the one-line `_write_error` for `out`."""
    try:
        yield
    except Exception as err:
        mapped = _write_failure(err, out)
        if mapped is not None:
            raise mapped from None
        raise


def _written_by_qbara(folder) -> bool:
    return (Path(folder) / _MANIFEST).is_file()


def _qbara_files(folder: Path) -> set[str]:
    try:
        files = read_json_file(folder / _MANIFEST, _MANIFEST).get("files", [])
        return {str(f) for f in files} if isinstance(files, list) else set()
    except QbaraError:  # damaged or foreign: none of the files count as qbara's
        return set()


def _qbara_gguf(path: Path) -> bool:
    try:
        field = gguf_reader(path).get_field("general.quantized_by")
        return field is not None and field.contents() == GGUF_MARK
    except Exception:  # not a (readable) GGUF: not ours
        return False


# ---------------------------------------------------------------- lock and recovery

_KINDS = ("new", "old", "tmp")  # a folder being built, the previous output moved aside, a file being written


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.qbara-lock"


class OutputLock:
    """The held lock of `out`; its file journals the pid, then each temporary before it gets content."""

    def __init__(self, out: Path, fd: int):
        self.out, self._fd, self._temporaries = out, fd, []

    def record(self, kind: str, path: Path, target: Path) -> None:
        """Journal `path`, a temporary of `kind` (see _KINDS) for `target`."""
        entry = {"kind": kind, "path": os.path.relpath(path, self.out.parent),
                 "target": os.path.relpath(target, self.out.parent)}
        os.lseek(self._fd, 0, os.SEEK_END)
        os.write(self._fd, (json.dumps(entry) + "\n").encode())
        self._temporaries.append(Path(path))

    def pending(self) -> bool:
        """Whether a temporary this run journaled is still on disk (the next run then recovers it)."""
        return any(os.path.lexists(p) for p in self._temporaries)

    @contextlib.contextmanager
    def replace_folder(self, target: Path, command: str = "", foreign: Iterable[str] | None = None,
                       mark: bool = True) -> Iterator[Path]:
        """Yield an empty temporary folder that replaces `target` on success (else removed)."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qbara-new-", dir=target.parent))
        self.record("new", tmp, target)
        try:
            with write_faults_as_errors(target):
                os.chmod(tmp, 0o777 & ~current_umask())
                yield tmp
                _install_folder(tmp, target, command, lock=self, foreign=foreign, mark=mark)
        except BaseException:
            _discard(tmp)
            raise


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[OutputLock]:
    """Hold `.NAME.qbara-lock` beside `out` (a second holder fails at once), recover what a killed run's
    journal lists, and journal this run's temporaries. The lock file stays only while a journaled temporary is left."""
    out = _resolved(out)
    lock_file = _lock_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, out)
    lock = OutputLock(out, fd)
    try:
        left = _journal(_read_lock(fd), out)
        _write_lock(fd, os.getpid(), left)  # a run killed while recovering leaves the rest to the next
        _recover(out, left)
        _write_lock(fd, os.getpid(), [])
        with atomic.recording_temporaries(lambda tmp, path: _record_file(lock, tmp, path)):
            yield lock
    finally:
        if not lock.pending():
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        os.close(fd)


def _acquire(lock_file: Path, out: Path) -> int:
    """Open and flock the lock file (retrying should the holder remove it meanwhile)."""
    while True:
        fd = _open_lock(lock_file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd).split("\n", 1)[0].strip()[:32] or "unknown"
            os.close(fd)
            raise QbaraError(f"{out} is being written by another qbara process (pid {holder}); wait for it to "
                             f"finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: take the new one


def _open_lock(lock_file: Path) -> int:
    """Open (or create) the lock file, never through a link nor a file that is not this user's own regular
    file: in a shared folder another user could plant one."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fix = f"qbara writes its lock only to a file it created: if no qbara run is writing there, remove {lock_file}"
    try:
        fd = os.open(lock_file, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise QbaraError(f"the lock file {lock_file} is a symbolic link; {fix}") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.ENXIO):
            raise QbaraError(f"cannot open the lock file {lock_file} ({err.strerror}); {fix}") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
               f"belongs to another user (uid {info.st_uid})" if info.st_uid != os.geteuid() else
               f"has {info.st_nlink} hard links (it may be another file)" if info.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise QbaraError(f"the lock file {lock_file} {problem}; {fix}")
    return fd


def _read_lock(fd: int) -> str:
    return os.pread(fd, 1 << 20, 0).decode(errors="replace")


def _write_lock(fd: int, pid: int, entries: list[tuple[str, Path, Path]]) -> None:
    lines = [str(pid)] + [json.dumps({"kind": k, "path": str(p), "target": str(t)}) for k, p, t in entries]
    os.ftruncate(fd, 0)
    os.pwrite(fd, ("\n".join(lines) + "\n").encode(), 0)


def _record_file(lock: OutputLock, tmp: Path, path: Path) -> None:
    """Journal a write_file_atomic temporary whose file is the output or directly in it."""
    path = _resolved(path)
    if path == lock.out or path.parent == lock.out:
        lock.record("tmp", _resolved(tmp), path)


def _journal(text: str, out: Path) -> list[tuple[str, Path, Path]]:
    """The (kind, path, target) entries of a lock file that name a qbara temporary for `out`; others ignored."""
    entries = []
    for line in text.splitlines()[1:]:
        try:
            entry = json.loads(line)
            kind, path, target = entry["kind"], Path(entry["path"]), Path(entry["target"])
        except (ValueError, KeyError, TypeError):
            continue
        if _is_temporary_name(kind, path, target, out):
            entries.append((kind, path, target))
    return entries


def _is_temporary_name(kind: str, path: Path, target: Path, out: Path) -> bool:
    """Whether `path` is a name qbara gives a temporary of `kind` for `target` (`out` or inside it)."""
    if path.is_absolute() or ".." in path.parts or ".." in target.parts or path.parent != target.parent:
        return False
    if not target.parts or target.parts[0] != out.name:
        return False
    if kind == "tmp":
        return path.name.startswith(f".{target.name}.") and path.name.endswith(".tmp")
    return kind in _KINDS and path.name.startswith(f".{target.name}.qbara-{kind}-")


def _recover(out: Path, journal: list[tuple[str, Path, Path]]) -> None:
    """Clean up after a killed run (lock held), touching only what its journal lists."""
    base = out.parent
    for kind, rel, target in sorted(journal, key=lambda e: _KINDS.index(e[0])):
        path, target = base / rel, base / target
        if not os.path.lexists(path):
            continue
        if kind == "new":
            _notice(f"removing {rel}, an unfinished output of an interrupted run")
            _remove(path)
        elif kind == "old" and not os.path.lexists(target):
            _notice(f"restoring {target} from {rel}: an interrupted run had moved it aside")
            fs.rename(path, target)
        elif kind == "old":
            _notice(f"removing {rel}, the previous output an interrupted run had replaced")
            _remove(path)
        elif path.is_file():
            _notice(f"removing {rel}, an unfinished file of an interrupted run")
            path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        fs.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- folder and file outputs


@contextlib.contextmanager
def output_folder(path, inputs: Iterable = (), *, overwrite: bool = False, command: str = "",
                  option: str = "--out") -> Iterator[Path]:
    """Check and lock `path`, yield an empty temporary folder for the output; swap it in on success."""
    out = check_output(path, inputs, overwrite=overwrite, kind="folder", option=option)
    with output_lock(out) as lock, lock.replace_folder(out, command) as tmp:
        yield tmp


@contextlib.contextmanager
def output_file(path, inputs: Iterable = (), *, overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """Check and lock the file `path`; yield it (write it with `qbara.atomic.write_file_atomic`)."""
    out = check_output(path, inputs, overwrite=overwrite, kind="file", option=option)
    with output_lock(out), write_faults_as_errors(out):
        yield out


def _folder_files(folder: Path) -> set[str]:
    """Relative paths of the files (and links) below `folder`, the manifest excepted."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.name != _MANIFEST}


def foreign_files(folder: Path) -> set[str]:
    """The files of `folder` that qbara did not write (all of them where it has no manifest)."""
    return _folder_files(folder) - _qbara_files(folder) if folder.is_dir() else set()


def mark_folder(folder: Path, command: str = "", foreign: Iterable[str] = ()) -> set[str]:
    """Write the manifest that makes `folder` one qbara wrote: every file now in it but `foreign` is qbara's."""
    files = sorted(_folder_files(folder) - set(foreign))
    write_json_atomic(folder / _MANIFEST, {"written_by": "qbara", "command": command, "files": files,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return set(files)


def _discard(tmp: Path) -> None:
    """Remove a failed run's unfinished output."""
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def _install_folder(new: Path, out: Path, command: str = "", *, lock: OutputLock | None = None,
                   foreign: Iterable[str] | None = None, mark: bool = True) -> None:
    """Make the complete folder `new` the output at `out`: manifest (if `mark`), carry the user's files
    over, then swap via a journaled backup. foreign: the user's files of `out` (default: those not in its manifest)."""
    if mark:
        mark_folder(new, command)
    if not out.exists():
        fs.rename(new, out)
        return
    ours = _qbara_files(out) if foreign is None else _folder_files(out) - set(foreign)
    kept = _carry_over(out, new, ours)
    if kept:
        _notice(f"kept {len(kept)} earlier file(s) the new output replaces in {out / REPLACED}: {kept[:3]}")
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.qbara-old-", dir=out.parent))
    if lock is not None:
        lock.record("old", backup, out)
    fs.rename(out, backup)  # a folder renames over an empty one
    fs.rename(new, out)
    try:
        if backup.is_symlink():
            backup.unlink()
        else:
            fs.rmtree(backup)
    except OSError as err:
        _notice(f"could not remove the previous output {backup} ({err}); the next run removes it")


def _carry_over(old: Path, new: Path, ours: set[str]) -> list[str]:
    """Link (or copy) every file of `old` not in `ours` into `new`; a name clash goes to
    `new/qbara-replaced/`. Returns the clashing names."""
    ours = set(ours) | {_MANIFEST}
    replaced = []
    for source in sorted(old.rglob("*")):
        rel = str(source.relative_to(old))
        if source.is_dir() and not source.is_symlink():
            if not any(source.iterdir()) and not (new / rel).exists():
                fs.makedirs(new / rel, exist_ok=True)
            continue
        if rel in ours:
            continue
        target = new / rel
        if target.exists() or target.is_symlink() or any(p.is_file() for p in target.parents if _under(p, new)):
            target = new / REPLACED / rel
            replaced.append(rel)
        fs.makedirs(target.parent, exist_ok=True)
        if source.is_symlink():
            fs.symlink(os.readlink(source), target)
            continue
        try:
            fs.link(source, target)
        except OSError:
            fs.copy(source, target)
    return replaced


def _under(path: Path, root: Path) -> bool:
    return path != root and root in path.parents
