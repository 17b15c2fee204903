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
    value = proc_status(field).get(field)
    if value is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return value


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


def proc_status(*fields: str) -> dict[str, int]:
    """Several memory fields of /proc/self/status in bytes, read at one moment."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) * 1024
    return values


class PeakAnon:
    """Peak anonymous resident memory (RssAnon: the process's own allocations) and peak resident set (VmRSS: also
    the file pages it maps) of this process while the block runs, sampled in a thread. `split()` closes a segment
    (a training step) and starts the next: `segments` holds each one's (peak anon, peak RSS)."""

    def __init__(self, every: float = 0.01):
        self.peak, self.peak_rss, self.every, self._stop = 0, 0, every, threading.Event()
        self.segments: list[tuple[int, int]] = []
        self._segment, self._lock = [0, 0], threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        return proc_status_bytes("RssAnon")

    def _sample(self):
        values = proc_status("RssAnon", "VmRSS")
        anon, rss = values["RssAnon"], values["VmRSS"]
        with self._lock:
            self.peak, self.peak_rss = max(self.peak, anon), max(self.peak_rss, rss)
            self._segment = [max(self._segment[0], anon), max(self._segment[1], rss)]

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def split(self) -> tuple[int, int]:
        """Close the current segment: its (peak anon, peak RSS), also appended to `segments`."""
        self._sample()
        with self._lock:
            segment, self._segment = tuple(self._segment), [0, 0]
        self.segments.append(segment)
        return segment

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def timed_training_steps(model, ids, optimizer, steps: int, monitor: PeakAnon | None = None,
                         after_step: Callable[[], None] | None = None, progress: bool = False
                         ) -> tuple[list[float], float]:
    """Run `steps` forward/backward/optimizer steps on `ids` (labels = inputs); each step's seconds and the
    last loss. monitor: a running PeakAnon split after each step (per-step peaks in its `segments`); after_step:
    called after each step, outside its time (e.g. releasing freed heap pages); progress: a tqdm bar of the steps."""
    times = []
    for _ in tqdm(range(steps), desc="training steps", leave=False, file=sys.stderr, disable=not progress):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if monitor is not None:
            monitor.split()
        if after_step is not None:
            after_step()
    return times, float(loss.detach())


def version(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
