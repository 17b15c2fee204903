"""Attach adapters to a model's target linears, and find them again."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from qbara.adapters.base import AdaptedLinear
from qbara.adapters.config import AdapterConfig
from qbara.adapters.methods import build_adapter
from qbara.errors import QbaraError
from qbara.state import enable_native_save, state_of
from qbara.targets import linear_layer_names, set_submodule

__all__ = ["attach_adapters", "adapter_layers", "trainable_parameter_count"]


def attach_adapters(model: nn.Module, config: AdapterConfig,
                    factors: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> nn.Module:
    """Wrap every target linear of `model` in its adapter layer, in place; only adapters train. `factors`
    (name -> (L1, L2), init 'lq' / 'loftq') start each LoRA at s·B A = L1 L2."""
    if config.init != "default" and factors is None:
        raise QbaraError(f"init={config.init!r} starts LoRA from a decomposition of the dense weights: use "
                         f"qbara.prepare(dense_model, LQConfig(...), adapter), not attach_adapters on its own")
    names = linear_layer_names(model, config.target_modules)
    layers = {n: build_adapter(model.get_submodule(n), config, n) for n in names}  # validate all first
    if factors is not None:
        unmatched = sorted(set(names) ^ set(factors))
        if unmatched:
            raise QbaraError(f"the factors and the adapter targets differ on {unmatched[:3]}; decompose the same "
                             f"layers the adapter targets")
        for name, layer in layers.items():
            layer.init_from_factors(*factors[name])
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)
    state_of(model).adapter_config = config
    return enable_native_save(model)


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Name -> adapter layer, for every adapted linear of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
