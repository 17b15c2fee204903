"""Run by test_fsdp.py in 2 processes (gloo on CPU): load a small LLaMA folder whole and rank-locally, shard both,
train both, and record what each rank held while loading and after."""
import os

import torch

from qbara import load_model, prepare
from qbara.adapters.config import AdapterConfig
from qbara.models import streaming
from qbara.quant.config import QuantConfig
from qbara.train.fsdp import local_packed_bytes, rank_local_loading, shard_model

QUANT = QuantConfig("nf4", block_size=64, double_quant=True)


def held_bytes(model) -> int:
    """Bytes of the real (not meta) parameters and buffers the model holds, each storage counted once."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if not tensor.is_meta:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


class HeldWhileLoading:
    """The most bytes the model being filled holds, read each time the load pipeline puts a tensor into it."""

    def __init__(self):
        self.peak = 0
        self.originals = (streaming.set_submodule, streaming._set_tensor)

    def __enter__(self):
        set_submodule, set_tensor = self.originals

        def measured_submodule(model, name, module):
            set_submodule(model, name, module)
            self.peak = max(self.peak, held_bytes(model))

        def measured_tensor(model, key, tensor):
            set_tensor(model, key, tensor)
            self.peak = max(self.peak, held_bytes(model))

        streaming.set_submodule, streaming._set_tensor = measured_submodule, measured_tensor
        return self

    def __exit__(self, *exc):
        streaming.set_submodule, streaming._set_tensor = self.originals


def _load_train(folder, local: bool, ids, steps: int = 3):
    with HeldWhileLoading() as held:
        if local:
            with rank_local_loading():
                model = load_model(folder, quant=QUANT)[0]
        else:
            model = load_model(folder, quant=QUANT)[0]
    layer_bytes = max(held_bytes(layer) for layer in model.model.layers)
    torch.manual_seed(0)
    model = prepare(model, QUANT, AdapterConfig(method="lora", rank=4))
    model.train()
    shard_model(model)
    shards = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()}
    local_bytes, total = local_packed_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    adapter = {n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad}
    return {"held_loading": held.peak, "layer_bytes": layer_bytes, "shards": shards, "local": local_bytes, "total": total, "losses": losses,
            "adapter": adapter}


def run(rank: int, world: int, port: int, folders: list[str], out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for folder in folders:
            ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(rank))
            result[folder] = {"whole": _load_train(folder, False, ids), "local": _load_train(folder, True, ids)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
