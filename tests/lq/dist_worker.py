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


def _join(dist, rank: int, world: int, port: int) -> None:
    """One thread per process, then join the gloo group on this machine."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import qbara.lq.tables as tables
    from qbara.lq.tables import error_table

    real, calls = tables.matrix_costs, []

    def counted(W, configs, **kwargs):  # which matrices this rank computes (the others it resumes or gets)
        calls.append(kwargs["name"])
        return real(W, configs, **kwargs)

    tables.matrix_costs = counted
    _join(dist, rank, world, port)
    try:
        kwargs = dict(rank=4, iters=3, dq_mode="shared", progress=False, cache_dir=os.path.join(out_dir, "cache"))
        table = error_table(small_weights(), small_configs(), **kwargs)
        again = error_table(small_weights(), small_configs(), **kwargs)  # every rank hits the cache
        torch.save({"costs": table.costs, "from_cache": [table.from_cache, again.from_cache], "calls": calls,
                    "again": again.costs, "alloc": {b: table.allocate(b).indices for b in (2.6, 3.0, 3.6)}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_decompose(rank: int, world: int, port: int, out_dir: str) -> None:
    """decompose_layers under 2 ranks: every rank must end with every matrix's decomposition."""
    import json

    import torch.distributed as dist
    from safetensors.torch import save_file

    from qbara.lq.configs import qlora_config
    from qbara.lq.layers import decompose_layers

    _join(dist, rank, world, port)
    try:
        weights = small_weights()
        configs = {n: qlora_config(3 if i % 2 else 4) for i, n in enumerate(weights)}
        decs = decompose_layers(weights, configs, 4, max_iters=5, progress=False)
        tensors = {}
        for n, d in decs.items():
            tensors[f"{n}.L1"], tensors[f"{n}.L2"] = d.L1.contiguous(), d.L2.contiguous()
            for k, t in d.qtensor.tensors.items():
                tensors[f"{n}.{k}"] = t.contiguous()
        save_file(tensors, os.path.join(out_dir, f"decomp{rank}.safetensors"))
        with open(os.path.join(out_dir, f"decomp{rank}.json"), "w") as fh:
            json.dump({n: [d.errors, d.best_iter] for n, d in decs.items()}, fh)
    finally:
        dist.destroy_process_group()
