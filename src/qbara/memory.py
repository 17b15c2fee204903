"""Handing freed heap memory back to the operating system."""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["release_freed_memory"]


def release_freed_memory() -> None:
    """Return heap pages freed by temporaries to the OS (glibc keeps them, pinned by small
    long-lived allocations); a no-op without glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
