"""Measurement helpers shared by the benchmark scripts: interleaved timing, process and CUDA memory, versions."""
from __future__ import annotations

import gc
import importlib.metadata
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qbara.memory import release_freed_memory as _malloc_trim


def synchronize(device: str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so a timer sees the work it started."""
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(jobs: dict[str, Callable[[], None]], repeats: int, device: str,
                        progress: str | None = None) -> dict[str, float]:
    """Median seconds of each job over `repeats` rounds after one warm-up round; each round runs every job
    once, in turn, so that a slower or faster moment of a shared machine falls on all of them."""
    times = {name: [] for name in jobs}
    for round_ in tqdm(range(1 + repeats), desc=progress, disable=progress is None, leave=False, file=sys.stderr):
        for name, job in jobs.items():
            synchronize(device)
            start = time.perf_counter()
            job()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident, RssAnon: anonymous
    resident) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS counts live memory."""
    gc.collect()
    _malloc_trim()


def memory_in_use(device: str) -> int:
    """Bytes in use now: allocated CUDA memory, or this process's resident set."""
    return torch.cuda.memory_allocated() if device == "cuda" else proc_status_bytes("VmRSS")


def peak_memory(device: str) -> int:
    """Peak bytes since the last reset: allocated CUDA memory, or this process's resident set (VmHWM)."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else proc_status_bytes("VmHWM")


def reset_peak_memory(device: str) -> bool:
    """Start a new peak; False where the CPU peak cannot be reset (it then covers the whole process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        return False
    return True


class PeakAnon:
    """Peak anonymous resident memory (RssAnon) of this process while the block runs, sampled in a thread."""

    def __init__(self, every: float = 0.01):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        return proc_status_bytes("RssAnon")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def timed_training_steps(model, ids, optimizer, steps: int) -> tuple[list[float], float]:
    """Run `steps` forward/backward/optimizer steps on `ids` (labels = inputs); each step's seconds and the
    last loss."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times, float(loss.detach())


def version(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
