"""The progress of an LQ error table on disk: each finished matrix's cost row, so that an interrupted table
resumes where it stopped. Rows live in `table-{key}.partial/` beside the cache entry (same settings key), one
safetensors file per matrix (`row-{i:05d}.safetensors`, written atomically; its metadata: key, matrix name and
index, number of configs, the costs' SHA-256). The folder is qbara's only if it holds the marker it was created
with (it appears, renamed into place, with the marker inside); there only regular files at row names are read,
replaced and removed. A folder without the marker, a symbolic link, any other file is left alone."""
from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from qbara.atomic import current_umask, save_safetensors_atomic, write_json_atomic
from qbara.errors import QbaraError
from qbara.tensor_checks import tensors_digest
from qbara.validate import read_json_file

__all__ = ["TableRows"]

_MARKER = ".qbara-table-rows.json"
_FORMAT = "qbara-lq-table-rows"
_ROW_FORMAT = "qbara-lq-table-row"
_MAX_ROW_BYTES = 1 << 24  # a row of 432 configs is ~4 KB


def _row_name(i: int) -> str:
    return f"row-{i:05d}.safetensors"


def _occupied(path: Path) -> bool:
    """Whether something other than a regular file (a link, a folder) is at `path`."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class TableRows:
    """The saved rows of one table (`key`: its cache key; `names`: its matrices; `n_configs`: its columns).
    Thread-safe: workers save distinct rows concurrently. `warn`: whether this process reports leftovers."""

    def __init__(self, folder, key: str, names: Sequence[str], n_configs: int, warn: bool = True):
        self.folder, self.key, self.names, self.n_configs = Path(folder), key, list(names), int(n_configs)
        self._warn, self._lock, self._disabled = warn, threading.Lock(), False

    # -- ownership -----------------------------------------------------------------------------------
    def _state(self) -> str:
        """'absent', 'ours' (a real folder holding this table's marker) or 'foreign'."""
        try:
            info = os.lstat(self.folder)
        except FileNotFoundError:
            return "absent"
        if not stat.S_ISDIR(info.st_mode):  # a symbolic link (even to a folder) or a file: not followed
            return "foreign"
        marker = self.folder / _MARKER
        try:
            if not stat.S_ISREG(os.lstat(marker).st_mode):
                return "foreign"
            meta = read_json_file(marker, "LQ error table progress marker")
        except (OSError, QbaraError):
            return "foreign"
        return "ours" if meta.get("format") == _FORMAT and meta.get("key") == self.key else "foreign"

    def _refuse_foreign(self) -> None:
        self._disabled = True
        if not self._warn:  # under torchrun: rank 0 says it
            return
        warnings.warn(f"{self.folder} was not written by qbara (no progress marker of this table, or a link): "
                      f"left alone, the LQ error table is neither resumed from it nor saves its progress there; "
                      f"move it away to make the table resumable", stacklevel=4)

    def _create(self) -> None:
        """Make the folder with its marker in one rename; another process may win the race (then it is ours)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.qbara-new-", dir=self.folder.parent))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # a new folder's permissions (mkdtemp's are 0700)
            write_json_atomic(tmp / _MARKER, {"format": _FORMAT, "key": self.key, "matrices": len(self.names)})
            if not os.path.lexists(self.folder):  # never renamed over anything, not even an empty folder
                try:
                    os.rename(tmp, self.folder)
                except OSError:  # another rank or process made it meanwhile
                    pass
        finally:
            if tmp.is_dir():
                (tmp / _MARKER).unlink(missing_ok=True)
                tmp.rmdir()

    # -- rows ----------------------------------------------------------------------------------------
    def load(self, indices: Iterable[int]) -> dict[int, Tensor]:
        """The verified rows among `indices`; damaged or mismatched ones are reported in one warning (recomputed)."""
        state = self._state()
        if state == "foreign":
            self._refuse_foreign()
        if state != "ours":
            return {}
        rows, bad = {}, []
        for i in indices:
            path = self.folder / _row_name(i)
            if not os.path.lexists(path):
                continue
            try:
                rows[i] = self._read(i, path)
            except QbaraError as err:
                bad.append(f"{_row_name(i)}: {err}")
        if bad:
            warnings.warn(f"{len(bad)} saved row(s) of the LQ error table in {self.folder} are damaged or belong to "
                          f"another table, recomputing them ({bad[0]})", stacklevel=3)
        return rows

    def _read(self, i: int, path: Path) -> Tensor:
        """Row i of `path` if every check passes, else QbaraError saying why; a link is never followed."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise QbaraError(f"cannot open it ({err.strerror or err}; a link is not followed)") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_ROW_BYTES:
                raise QbaraError("not a regular file of a row's size")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(_MAX_ROW_BYTES + 1)
        finally:
            os.close(fd)
        try:  # safetensors' own parser first: the header is then a flat, valid one
            costs = load_safetensors_bytes(data)["costs"]
            meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except (ValueError, KeyError, AttributeError, RecursionError, SafetensorError) as err:
            raise QbaraError(f"not a readable row ({type(err).__name__})") from None
        expected = {"format": _ROW_FORMAT, "key": self.key, "name": self.names[i], "index": str(i),
                    "configs": str(self.n_configs)}
        wrong = [k for k, v in expected.items() if meta.get(k) != v]
        if wrong:
            raise QbaraError(f"its {', '.join(wrong)} differ from this table's")
        if costs.dtype != torch.float64 or tuple(costs.shape) != (self.n_configs,):
            raise QbaraError(f"{costs.dtype} {tuple(costs.shape)}, expected float64 ({self.n_configs},)")
        if tensors_digest({"costs": costs}) != meta.get("sha256"):
            raise QbaraError("its costs differ from those written (SHA-256)")
        return costs

    def save(self, i: int, costs: Tensor) -> None:
        """Keep row i (a finished matrix); a write fault is reported once and the table goes on without saving."""
        with self._lock:
            if self._disabled:
                return
            try:
                state = self._state()
                if state == "absent":
                    self._create()
                    state = self._state()
            except OSError as err:
                self._cannot_save(err)
                return
            if state == "foreign":
                self._refuse_foreign()
                return
            if state == "absent":  # never written into without its marker
                self._cannot_save(OSError("the folder could not be created"))
                return
        path = self.folder / _row_name(i)
        if _occupied(path):
            return  # not a row qbara wrote: left alone (reported when the table is finished)
        costs = costs.detach().to("cpu", torch.float64).contiguous().clone()
        meta = {"format": _ROW_FORMAT, "key": self.key, "name": self.names[i], "index": str(i),
                "configs": str(self.n_configs), "sha256": tensors_digest({"costs": costs})}
        try:
            save_safetensors_atomic({"costs": costs}, path, metadata=meta)
        except (OSError, SafetensorError) as err:
            with self._lock:
                if not self._disabled:
                    self._cannot_save(err)

    def _cannot_save(self, err: BaseException) -> None:
        self._disabled = True
        warnings.warn(f"cannot save the LQ error table's progress in {self.folder} ({err}); it goes on without "
                      f"(an interruption would start it over)", stacklevel=4)

    def _own_rows(self, indices: Iterable[int] | None = None) -> list[Path]:
        """The regular files at row names (of `indices`, default all) in the folder, when it is ours."""
        if self._state() != "ours":
            return []
        wanted = {_row_name(i) for i in (range(len(self.names)) if indices is None else indices)}
        try:
            with os.scandir(self.folder) as entries:
                return [Path(e.path) for e in entries if e.name in wanted and e.is_file(follow_symlinks=False)]
        except FileNotFoundError:  # another rank finished it meanwhile
            return []

    def discard(self, indices: Iterable[int]) -> None:
        """Remove the saved rows of `indices` (recompute=True: they are computed again)."""
        for path in self._own_rows(indices):
            path.unlink(missing_ok=True)

    def finish(self) -> None:
        """The table is saved: remove its rows, then the marker and folder unless files qbara did not write are
        left (then kept, with the marker, and reported). Another rank may be finishing the same folder."""
        if self._state() != "ours":
            return
        for path in self._own_rows():
            path.unlink(missing_ok=True)
        try:
            with os.scandir(self.folder) as entries:
                left = sorted(e.name for e in entries if e.name != _MARKER)
        except FileNotFoundError:
            return
        if left:
            if self._warn:
                warnings.warn(f"kept {self.folder}: it holds files that are not rows of this table, which qbara "
                              f"leaves alone ({left[:3]}); remove it yourself", stacklevel=3)
            return
        (self.folder / _MARKER).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # gone (another rank) or not empty (a file appeared): left alone
            pass

