"""Per-matrix work spread over threads and, under torch.distributed, over processes. Ctrl-C cancels the matrices
not started and stops running ones at their next `check_cancelled`, so no worker thread outlives the call (a
torch thread still running at interpreter exit aborts the process)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from tqdm.auto import tqdm

from qbara.distributed import running_group, world_size
from qbara.memory import release_freed_memory


def shard(numels: Sequence[int], world: int) -> list[list[int]]:
    """Deterministic greedy split of matrix indices into `world` shares of similar total size."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += numels[i]
    return [sorted(s) for s in shares]


def active_dist():
    """torch.distributed when a process group of more than one rank is running, else None."""
    return running_group() if world_size() > 1 else None


def collective_device(dist) -> torch.device:
    """Where tensors must live for the group's collectives (CUDA for NCCL, else CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def my_share(numels: Sequence[int]) -> list[int]:
    """The matrix indices this process works on: all of them, or its share under torch.distributed."""
    dist = active_dist()
    if dist is None:
        return list(range(len(numels)))
    return shard(numels, dist.get_world_size())[dist.get_rank()]


def owners(numels: Sequence[int]) -> list[int]:
    """The rank that works on each matrix (all 0 without torch.distributed)."""
    dist = active_dist()
    owner = [0] * len(numels)
    if dist is not None:
        for r, share in enumerate(shard(numels, dist.get_world_size())):
            for i in share:
                owner[i] = r
    return owner


class Cancelled(Exception):
    """Raised in a worker by `check_cancelled` once its run was interrupted."""


_worker = threading.local()  # the cancel event of the run a worker thread works for


def check_cancelled() -> None:
    """In a `run_per_matrix` worker: raise Cancelled once the run was interrupted; elsewhere nothing."""
    event = getattr(_worker, "cancel", None)
    if event is not None and event.is_set():
        raise Cancelled


def run_per_matrix(indices: Sequence[int], work: Callable[[int], None], sizes: Sequence[int],
                   workers: int | None = None, progress: bool = True, desc: str = "matrices") -> None:
    """Call work(i) for every index, biggest `sizes[i]` first, on `workers` threads of one torch thread each
    (default torch.get_num_threads()). `work` must be thread-safe; freed heap goes back to the OS after each call."""
    workers = max(1, int(workers if workers is not None else torch.get_num_threads()))
    workers = min(workers, max(1, len(indices)))
    order = sorted(indices, key=lambda i: -sizes[i])  # big first: the pool does not end on a straggler
    bar = tqdm(total=len(order), desc=desc, unit="matrix", disable=not progress)
    old_threads = torch.get_num_threads()
    try:
        if workers == 1:
            for i in order:
                work(i)
                release_freed_memory()
                bar.update(1)
        else:
            torch.set_num_threads(1)
            cancel = threading.Event()

            def task(i):
                _worker.cancel = cancel
                check_cancelled()
                work(i)
                release_freed_memory()

            with ThreadPoolExecutor(max_workers=workers) as pool:
                try:
                    futures = [pool.submit(task, i) for i in order]
                    for fut in as_completed(futures):
                        fut.result()
                        bar.update(1)
                except BaseException:  # Ctrl-C or a failed matrix: stop the others, then leave the pool
                    cancel.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        torch.set_num_threads(old_threads)
        bar.close()
