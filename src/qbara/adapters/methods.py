"""The adapter methods by name; each is an `AdapterMethod` defined beside its layer in its own file."""
from __future__ import annotations

from torch import nn

from qbara.adapters import lora, qahira, qalora, qbara
from qbara.adapters.base import AdaptedLinear, AdapterMethod

__all__ = ["METHODS", "DEFAULT_METHOD", "ADAPTER_TENSORS"]

METHODS: dict[str, AdapterMethod] = {method.name: method for method in (
    lora.LORA,
    qalora.QALORA,
    qbara.QBARA,
    qahira.QAHIRA,
)}
DEFAULT_METHOD = lora.LORA.name
# The names of every method's saved tensors, for recognising adapter weights in a checkpoint.
ADAPTER_TENSORS = tuple(dict.fromkeys(tensor for method in METHODS.values() for tensor in method.tensors))


def build_adapter(base: nn.Module, config, name: str = "layer") -> AdaptedLinear:
    """The adapter layer on `base` (QuantizedLinear or nn.Linear) that `config` describes."""
    return METHODS[config.method].build(base, config, name)
