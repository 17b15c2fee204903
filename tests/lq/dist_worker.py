"""Run by test_tables.py in 2 processes (torch.multiprocessing.spawn, gloo on CPU)."""
import os

import torch


def small_weights() -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (32, 64), (128, 64), (64, 128), (64, 64), (32, 64), (96, 128)]
    return {f"layer{i}.proj": torch.randn(s, generator=g) * 0.02 for i, s in enumerate(shapes)}


def small_configs():
    from qbara.lq.configs import candidate_configs

    return candidate_configs(code_bits=(2, 3, 4), block_sizes=(32, 64), dq_bits=(4, 8), dq_dtypes=("fp32",),
                             dq_block_sizes=(16, 256))


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from qbara.lq.tables import error_table

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        kwargs = dict(rank=4, iters=3, progress=False, cache_dir=os.path.join(out_dir, "cache"))
        table = error_table(small_weights(), small_configs(), **kwargs)
        again = error_table(small_weights(), small_configs(), **kwargs)  # every rank hits the cache
        torch.save({"costs": table.costs, "from_cache": [table.from_cache, again.from_cache],
                    "again": again.costs, "alloc": {b: table.allocate(b).indices for b in (2.6, 3.0, 3.6)}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
