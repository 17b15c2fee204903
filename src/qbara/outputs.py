"""Where qbara writes: one rule for every output folder or file, checked before any work starts.

- An output equal to or containing an input (model, adapter, data) or the working folder is refused.
- An existing non-empty output that qbara did not write is refused unless `overwrite`; qbara knows its own
  folders by the manifest `.qbara-output.json` listing the files it wrote (a GGUF file by its
  `general.quantized_by` entry).
- Nothing qbara did not write is deleted: replacing a folder carries every other file over into the new
  folder (hard links, no copy), and a foreign file whose name the new output takes is kept under
  `qbara-replaced/`.
- A folder is built beside its destination and swapped in by renames (old -> backup, new -> path, backup
  deleted), so at every instant the path holds the complete old or the complete new output. A file is
  written beside and renamed over.
- A lock file beside the output (`.NAME.qbara-lock`): a second qbara process on the same output fails at
  once with the holder's pid. Taking the lock recovers what a killed run left: a backup whose new output
  never arrived is renamed back, other backups and temporaries are removed, each with a notice.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from qbara.atomic import current_umask, write_json_atomic
from qbara.errors import QbaraError
from qbara.validate import read_json_file

MANIFEST = ".qbara-output.json"
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


def notice(message: str) -> None:
    print(f"qbara: {message}", file=sys.stderr)


# ---------------------------------------------------------------- checks


def _resolved(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(path, inputs: Iterable = (), *, overwrite: bool = False, kind: str = "folder",
                 option: str = "--out") -> Path:
    """Refuse an output that would destroy an input or a user's files; returns the absolute path.

    inputs: paths the command reads (names that are not paths on disk, like 'smollm2-135m', are skipped).
    kind: 'folder' or 'file'.
    """
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
        if out.is_dir() and any(out.iterdir()) and not written_by_qbara(out) and not overwrite:
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
    """Refuse an output under a file, or in a folder this process cannot write into (read-only, or a
    pseudo filesystem such as /proc): before any work starts."""
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
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO, None}


def write_error(err: OSError, out) -> QbaraError:
    """One line for an I/O error while writing the output `out` (disk full, file too large, read-only
    filesystem): the path, the cause, and that the previous output is kept."""
    path = err.filename or out
    cause = err.strerror or str(err)
    return QbaraError(f"cannot write {path} ({cause}); the previous output at {out} is kept: free space or "
                      f"raise the limit and run again")


def written_by_qbara(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _qbara_files(folder: Path) -> set[str]:
    try:
        files = read_json_file(folder / MANIFEST, MANIFEST).get("files", [])
        return {str(f) for f in files} if isinstance(files, list) else set()
    except QbaraError:  # damaged or foreign: none of the files count as qbara's
        return set()


def _qbara_gguf(path: Path) -> bool:
    try:
        from qbara.validate import gguf_reader

        field = gguf_reader(path).get_field("general.quantized_by")
        return field is not None and field.contents() == GGUF_MARK
    except Exception:  # not a (readable) GGUF: not ours
        return False


# ---------------------------------------------------------------- lock and recovery


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.qbara-lock` beside `out`; another holder makes this fail at once with its pid."""
    lock = out.parent / f".{out.name}.qbara-lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise QbaraError(f"{out} is being written by another qbara process (pid {holder}); wait for it to "
                             f"finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        recover(out)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _leftovers(out: Path, tag: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.qbara-{tag}-*"))


def recover(out: Path) -> None:
    """Clean up after a killed run (call with the lock held): restore or remove backups, remove temporaries."""
    for tmp in _leftovers(out, "new"):
        notice(f"removing {tmp.name}, an unfinished output of an interrupted run")
        fs.rmtree(tmp, ignore_errors=True)
    for backup in _leftovers(out, "old"):
        if not out.exists():
            notice(f"restoring {out} from {backup.name}: an interrupted run had moved it aside")
            fs.rename(backup, out)
        else:
            notice(f"removing {backup.name}, the previous output an interrupted run had replaced")
            fs.rmtree(backup, ignore_errors=True)
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):  # write_file_atomic's temporaries
        if tmp.is_file():
            notice(f"removing {tmp.name}, an unfinished file of an interrupted run")
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- folder and file outputs


@contextlib.contextmanager
def output_folder(path, inputs: Iterable = (), *, overwrite: bool = False, command: str = "",
                  option: str = "--out") -> Iterator[Path]:
    """Check and lock `path`, yield an empty temporary folder beside it to write the output into; on
    success swap it in (the user's other files carried over), on failure remove it."""
    out = check_output(path, inputs, overwrite=overwrite, kind="folder", option=option)
    with output_lock(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qbara-new-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            install_folder(tmp, out, command)
        except OSError as err:
            discard(tmp)
            if err.errno in WRITE_ERRNOS:
                raise write_error(err, out) from None
            raise
        except BaseException:
            discard(tmp)
            raise


@contextlib.contextmanager
def output_file(path, inputs: Iterable = (), *, overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """Check and lock the file `path`; yield it (write it with `qbara.atomic.write_file_atomic`)."""
    out = check_output(path, inputs, overwrite=overwrite, kind="file", option=option)
    with output_lock(out):
        try:
            yield out
        except OSError as err:
            if err.errno in WRITE_ERRNOS:
                raise write_error(err, out) from None
            raise


def folder_files(folder: Path) -> set[str]:
    """Relative paths of the files (and links) below `folder`, the manifest excepted."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.name != MANIFEST}


def foreign_files(folder: Path) -> set[str]:
    """The files of `folder` that qbara did not write (all of them where it has no manifest)."""
    return folder_files(folder) - _qbara_files(folder) if folder.is_dir() else set()


def mark_folder(folder: Path, command: str = "", foreign: Iterable[str] = ()) -> set[str]:
    """Write the manifest that makes `folder` one qbara wrote: every file now in it but `foreign` is qbara's."""
    files = sorted(folder_files(folder) - set(foreign))
    write_json_atomic(folder / MANIFEST, {"written_by": "qbara", "command": command, "files": files,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return set(files)


def discard(tmp: Path) -> None:
    """Remove the unfinished output of a failed run (a killed run skips this; the next run's `recover` does it)."""
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def install_folder(new: Path, out: Path, command: str = "") -> None:
    """Make the complete folder `new` the output at `out`: write its manifest, carry the user's files over
    from an existing `out`, then swap (old -> backup, new -> out, backup removed)."""
    files = mark_folder(new, command)
    if not out.exists():
        fs.rename(new, out)
        return
    kept = _carry_over(out, new, files)
    if kept:
        notice(f"kept {len(kept)} earlier file(s) the new output replaces in {out / REPLACED}: {kept[:3]}")
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.qbara-old-", dir=out.parent))
    fs.rename(out, backup)  # a folder renames over an empty one
    fs.rename(new, out)
    try:
        if backup.is_symlink():
            backup.unlink()
        else:
            fs.rmtree(backup)
    except OSError as err:
        notice(f"could not remove the previous output {backup} ({err}); the next run removes it")


def _carry_over(old: Path, new: Path, new_files: set[str]) -> list[str]:
    """Link every file of `old` that qbara did not write into `new` (a copy where links are not possible);
    one whose name `new` already uses goes to `new/qbara-replaced/`. Returns those names."""
    ours = _qbara_files(old) | {MANIFEST}
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


def _umask() -> int:
    return current_umask()
