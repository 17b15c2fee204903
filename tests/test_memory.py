"""bound_heap_growth: glibc's own rule (a freed 8 MiB block lifts the mmap threshold, so the next 4 MiB block comes
from the heap, where a training step's freed activations fragment it) is switched off; checked against where the
block lands in /proc/self/maps, in a fresh process each (the setting is process-wide)."""
import subprocess
import sys
from pathlib import Path

import pytest

from qbara import memory

PROBE = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[2])  # the module alone: no torch to import
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
if sys.argv[1] == "bound":
    assert memory.bound_heap_growth()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
block = libc.malloc(4 << 20)
heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
print("heap" if any(int(a, 16) <= block < int(b, 16) for a, b in heap) else "mapped")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/maps").is_file(),
                    reason="glibc and /proc/self/maps")
def test_large_blocks_stay_mapped_after_a_larger_one_was_freed():
    module = memory.__file__
    where = {mode: subprocess.run([sys.executable, "-c", PROBE, mode, module], capture_output=True, text=True,
                                  check=True).stdout.strip()
             for mode in ("plain", "bound")}
    assert where == {"plain": "heap", "bound": "mapped"}
