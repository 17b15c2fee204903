"""Model fingerprints: a short digest of every base weight a model holds, to match adapters to their base."""
from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["model_fingerprint", "tensor_fingerprint", "combine_fingerprint"]


def model_fingerprint(model) -> str:
    """A short, stable hex digest of a base model: its architecture and every base tensor by name and shape,
    floats rounded to bf16 (fp32 and bf16 loads agree), packed buffers byte for byte, adapters left out. Digests
    combine in name order, so a loader can compute it tensor by tensor (`combine_fingerprint`)."""
    return combine_fingerprint(model.config, {name: tensor_fingerprint(name, t) for name, t in _base_tensors(model)})


def tensor_fingerprint(name: str, tensor: torch.Tensor) -> str:
    """The digest of one tensor as `model_fingerprint` sees it (floats rounded to bf16)."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(device="cpu", dtype=torch.bfloat16)
    tensor = tensor.to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    if tensor.numel():
        digest.update(tensor.view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def combine_fingerprint(config, digests: dict[str, str]) -> str:
    """The model fingerprint from its architecture and its tensors' digests."""
    arch = {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name in sorted(digests):
        digest.update(f"{name}={digests[name]};".encode())
    return digest.hexdigest()[:16]


def _base_tensors(model):
    """(name, tensor) of the base's state dict, adapter parameters left out and an adapted layer's base named as
    the layer, so a model hashes the same before and after `prepare` attaches adapters."""
    adapted = {n: m for n, m in model.named_modules() if callable(getattr(m, "adapter_parameters", None))}
    skip = {f"{name}.{p}" for name, layer in adapted.items() for p in layer.adapter_parameters()}
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        for name in adapted:
            if key.startswith(name + ".base."):
                key = name + key[len(name) + len(".base"):]
                break
        yield key, tensor
