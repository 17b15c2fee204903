"""Handing freed heap memory back to the operating system."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory", "bound_heap_growth"]


@functools.cache
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_LIMIT = 128 << 10  # glibc's own starting threshold, kept (bench/scale.py: flatter than 1 MiB, same step time)


def bound_heap_growth(threshold: int = HEAP_LIMIT) -> bool:
    """Serve every allocation of `threshold` bytes or more by its own mapping, handed back to the OS when freed,
    and stop glibc from raising that threshold itself. glibc lifts it to the largest block freed (up to 32 MiB), so
    after a first training step the next steps' activations come from the heap, fragment it, and the process
    grows from step to step (bench/scale.py measures it). Process-wide; False without glibc."""
    try:
        libc = _libc()
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
        libc.malloc_trim(0)  # and hand back what the heap holds free now (a load's freed work arrays)
        return done
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> None:
    """Return heap pages freed by temporaries to the OS (glibc keeps them, pinned by small
    long-lived allocations); a no-op without glibc."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
