"""Helpers shared by several test packages."""
import socket

import torch


def randomize_adapters(model, seed=0, std=0.05):
    """Non-zero adapter weights (every parameter that requires grad), so merges act on a real update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def free_port() -> int:
    """A free local TCP port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TargetReads:
    """Counts the target-linear weights (`*_proj.weight`) read through safetensors.safe_open (qbara's readers' too) and the most of them
    alive at once when another is read; `install(monkeypatch)` puts the tracking reader in place."""

    def __init__(self):
        self.alive, self.worst, self.reads = [], 0, 0

    def install(self, monkeypatch) -> "TargetReads":
        import safetensors

        import qbara.lazy_tensors
        import qbara.models.streaming

        real_open, tracker = safetensors.safe_open, self

        class Tracking:
            def __init__(self, *args, **kwargs):
                self.inner = real_open(*args, **kwargs)

            def __enter__(self):
                self.reader = self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.reader, name)

            def get_tensor(self, key):
                tensor = self.reader.get_tensor(key)
                if key.endswith("_proj.weight"):
                    tracker.seen(tensor)
                return tensor

        for target in (safetensors, qbara.lazy_tensors, qbara.models.streaming):  # the modules' own safe_open
            monkeypatch.setattr(target, "safe_open", Tracking)
        return self

    def seen(self, tensor) -> None:
        import weakref

        self.alive = [ref for ref in self.alive if ref() is not None]
        self.worst = max(self.worst, len(self.alive))
        self.alive.append(weakref.ref(tensor))
        self.reads += 1


def nonuniform_fisher(model, seed=1):
    """A strongly non-uniform Fisher for every linear but lm_head: random, with a few rows of every matrix 1000x
    heavier."""
    from qbara.targets import linear_layer_names

    gen = torch.Generator().manual_seed(seed)
    fisher = {}
    for n in linear_layer_names(model, "all-linear"):
        f = torch.rand(model.get_submodule(n).weight.shape, generator=gen)
        f[:4] *= 1000.0
        fisher[n] = f
    return fisher


_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args, timeout: float, **popen) -> tuple[int, str, str, int]:
    """Run `args` as a child process: (exit code, stdout, stderr, its own peak RSS in KiB). A small launcher forks
    it: Linux starts a forked child's peak at its parent's RSS, so measured straight from pytest (gigabytes after
    a long session) the peak would be the test process's; RUSAGE_CHILDREN would be the largest child ever."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak = os.path.join(tmp, "peak")
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, peak, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        with open(peak) as fh:
            return proc.returncode, out, err, int(fh.read())


def mapped_files(under) -> list[str]:
    """The files below `under` this process still has memory-mapped (Linux: /proc/self/maps), after a garbage
    collection, so only mappings something still holds count."""
    import gc
    from pathlib import Path

    gc.collect()
    root = str(Path(under).resolve())
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6
                   and line.split(maxsplit=5)[5].startswith(root)})
