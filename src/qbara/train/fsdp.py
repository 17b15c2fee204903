"""FSDP training: the packed quantized base and the adapters sharded across ranks with FSDP2 (`fully_shard`).

Each decoder layer (the model's `_no_split_modules`) is one FSDP unit, the rest (embeddings, norm, lm_head) the
root's: a rank keeps 1/N of every parameter and all-gathers a unit just before its forward and again before its
backward. `QuantizedLinear` holds its packed buffers as frozen parameters for this (FSDP shards parameters only),
so the all-gather moves packed bytes and each layer is dequantized after it, as in a single process. Adapter
gradients are reduce-scattered (averaged over ranks) into each rank's shard, and the optimizer steps the shards.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from qbara.adapters.attach import adapter_layers
from qbara.errors import QbaraError
from qbara.models.streaming import rank_rows, rows_held
from qbara.nn.quantized_linear import QuantizedLinear

__all__ = ["fsdp_choice", "fsdp_mode", "rank_local_loading", "shard_model", "is_sharded", "full_adapter_parameters",
           "local_packed_bytes", "full_optimizer_state", "load_full_optimizer_state"]

# what `accelerate launch` exports from an FSDP config, read as full_shard (FSDP1: the strategy's name or number;
# FSDP2: reshard_after_forward true); anything else keeps the unsharded gradients or parameters qbara does not do
_FULL_SHARD_STRATEGY = {"FULL_SHARD", "1", "NONE", ""}
_FULL_SHARD_RESHARD = {"TRUE", "FULL_SHARD", "1", ""}


def fsdp_choice(value) -> str:
    """train.fsdp as HF TrainingArguments writes it ("full_shard", "full_shard auto_wrap", true/false) -> "full_shard"
    or ""; qbara always wraps each decoder layer, so auto_wrap adds nothing."""
    if value is True:
        return "full_shard"
    if value in (False, None, ""):
        return ""
    words = set(str(value).lower().split()) - {"auto_wrap"}
    if words != {"full_shard"}:
        raise QbaraError(f"train.fsdp {value!r}: qbara shards with full_shard only (FSDP2 over torchrun ranks; "
                         f"shard_grad_op, hybrid_shard and offload are not supported): write full_shard, or leave it "
                         f"empty to train with DDP")
    return "full_shard"


def fsdp_mode(configured: str) -> str:
    """train.fsdp, or `full_shard` where `accelerate launch` ran with an FSDP config (it exports ACCELERATE_USE_FSDP,
    FSDP_VERSION, FSDP_SHARDING_STRATEGY, FSDP_RESHARD_AFTER_FORWARD); ACCELERATE_USE_FSDP is then taken off so that
    accelerate's own FSDP wrapping, which would not shard the packed storage, does not start as well."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return configured
    os.environ.pop("ACCELERATE_USE_FSDP")
    if os.environ.get("FSDP_VERSION", "1") == "2":
        setting, variable, ok = "fsdp_reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD", _FULL_SHARD_RESHARD
    else:
        setting, variable, ok = "fsdp_sharding_strategy", "FSDP_SHARDING_STRATEGY", _FULL_SHARD_STRATEGY
    value = os.environ.get(variable, "")
    if value.upper() not in ok:
        raise QbaraError(f"the accelerate config sets {setting}: {value}; qbara shards with FULL_SHARD only: set "
                         f"{setting} to {'true' if setting.startswith('fsdp_reshard') else 'FULL_SHARD'} "
                         f"(or train.fsdp: full_shard)")
    return "full_shard"


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise QbaraError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so qbara cannot "
                         f"split it into FSDP units; train it without train.fsdp")
    return layers


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise QbaraError("train.fsdp needs several processes: launch with torchrun (or accelerate launch), "
                         "or drop train.fsdp to train in one process")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def rank_local_loading():
    """Load within this so that each rank keeps only the rows `shard_model` will leave it of every weight it reads
    (the load pipeline's `rank_rows`): the load peak per rank falls to its 1/N share plus the tensor in hand,
    instead of the whole quantized model. The model computes only once `shard_model` has run."""
    with rank_rows(*_rank_and_world()):
        yield


def _meta_for_rows(model: nn.Module, share: tuple[int, int]) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Swap each parameter loaded as this rank's rows (`rank_local_loading`) for a meta parameter of its full
    shape, so `fully_shard` shards its shape without its data; returns (owner, name, the rows) for each owner."""
    swapped = {}
    for module in model.modules():
        for leaf, (shape, loaded_as) in rows_held(module).items():
            if loaded_as != share:
                raise QbaraError(f"the model was loaded as rank {loaded_as[0]} of {loaded_as[1]} and is sharded as "
                                 f"rank {share[0]} of {share[1]}: load and shard it in the same process group")
            part = module._parameters[leaf]
            meta = torch.empty(shape, dtype=part.dtype, device="meta")
            swapped.setdefault(id(part), (nn.Parameter(meta, requires_grad=False), part.data))
    owners = []
    for module in model.modules():  # every owner of a tied parameter gets the same meta one
        for leaf, param in module._parameters.items():
            if param is not None and id(param) in swapped:
                module._parameters[leaf], rows = swapped[id(param)]
                owners.append((module, leaf, rows))
    return owners


def _place_rows(owners: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Make each sharded meta parameter the DTensor of this rank's loaded rows (FSDP pads them where the chunks
    are uneven at its lazy init, as after `load_state_dict(assign=True)`)."""
    from torch.distributed.tensor import DTensor

    placed = {}
    for module, leaf, rows in owners:
        param = module._parameters[leaf]
        if id(param) not in placed:
            local = DTensor.from_local(rows, param.device_mesh, param.placements, run_check=False,
                                       shape=param.shape, stride=param.stride())
            placed[id(param)] = nn.Parameter(local, requires_grad=param.requires_grad)
        module._parameters[leaf] = placed[id(param)]


def shard_model(model: nn.Module) -> nn.Module:
    """Shard `model` in place across the default process group (gloo on CPU, nccl on GPU); returns it. A model
    loaded within `rank_local_loading` already holds only this rank's rows, which are put in place as they are."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    share = _rank_and_world()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.packed_as_parameters()
    owners = _meta_for_rows(model, share)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _place_rows(owners)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_packed_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of packed quantized storage this rank holds, bytes of the whole packed base)."""
    local = total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            for name in module._buffer_names:
                tensor = getattr(module, name)
                local += _local(tensor).numel() * tensor.element_size()
                total += tensor.numel() * tensor.element_size()
    return local, total


@contextlib.contextmanager
def full_adapter_parameters(model: nn.Module, write_back: bool = False):
    """On every rank (a collective): the adapter parameters all-gathered into plain tensors for the duration, so
    saving, checks and merging read the whole adapter; the shards are put back after (write_back: holding what
    the whole tensors hold then, e.g. an adapter loaded into them). A model that is not sharded is left as it is."""
    swapped = []
    for layer in adapter_layers(model).values():
        for name, param in layer.adapter_parameters().items():
            if hasattr(param, "full_tensor"):
                owner_name, _, leaf = name.rpartition(".")
                owner = layer.get_submodule(owner_name) if owner_name else layer
                full = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
                swapped.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = full
    try:
        yield model
    finally:
        for owner, leaf, param in swapped:
            full, owner._parameters[leaf] = owner._parameters[leaf], param
            if write_back:
                _write_shard(param, full)


def _write_shard(param, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor `full` into the sharded parameter `param`."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        param.copy_(distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state as whole tensors keyed by parameter name (a collective; rank 0 gets it, others {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load what `full_optimizer_state` saved into the sharded optimizer (every rank passes the whole state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
