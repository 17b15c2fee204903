"""The adapter methods by name, each a builder `build(base, config, name) -> AdaptedLinear` in its own file."""
from __future__ import annotations

from torch import nn

from qbara.adapters import lora, qahira, qalora, qbara
from qbara.adapters.base import AdaptedLinear

BUILDERS = {"lora": lora.build, "qalora": qalora.build, "qbara": qbara.build, "qahira": qahira.build}
METHODS = tuple(BUILDERS)


def build_adapter(base: nn.Module, config, name: str = "layer") -> AdaptedLinear:
    """The adapter layer for `base` (a QuantizedLinear or an nn.Linear) that `config` (an AdapterConfig)
    describes; `name` is used in error messages."""
    return BUILDERS[config.method](base, config, name)
