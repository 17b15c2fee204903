"""Run by test_fsdp.py in 2 processes (torch.multiprocessing.spawn, gloo on CPU): shard a prepared tiny model."""
import os

import torch


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from qbara import prepare
    from qbara.adapters.config import AdapterConfig
    from qbara.models import tiny_llama
    from qbara.quant.config import QuantConfig
    from qbara.train.fsdp import local_packed_bytes, shard_model
    from tests.helpers import randomize_adapters

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = prepare(tiny_llama()[0], QuantConfig("nf4", block_size=64), AdapterConfig(method="lora", rank=4))
        randomize_adapters(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
        shard_model(model)
        local, total = local_packed_bytes(model)
        logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"local": local, "total": total, "ids": ids, "logits": logits.detach(), "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
