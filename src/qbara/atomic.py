"""Atomic file writes: a temporary beside the target, fsync, then rename over it, so a kill leaves the old file
or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors.torch import save_file

__all__ = ["current_umask", "recording_temporaries", "save_safetensors_atomic", "write_bytes_atomic",
           "write_file_atomic", "write_json_atomic"]


def current_umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_recorders: list[Callable[[Path, Path], None]] = []


@contextlib.contextmanager
def recording_temporaries(record: Callable[[Path, Path], None]) -> Iterator[None]:
    """While inside, call `record(tmp, path)` for each temporary `write_file_atomic` creates, before writing."""
    _recorders.append(record)
    try:
        yield
    finally:
        _recorders.remove(record)


def write_file_atomic(path, write) -> Path:
    """Call `write(tmp_path)` for a temporary beside `path`, fsync it, give it a new file's
    permissions and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        for record in list(_recorders):
            record(Path(tmp), path)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path, data) -> Path:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
    return write_file_atomic(path, write)


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write a safetensors file (contiguous CPU tensors)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_bytes_atomic(path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)
    return write_file_atomic(path, write)
