"""Build the adapter layer a config asks for, and attach adapters to a model's target linears."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from qbara.adapters.config import AdapterConfig
from qbara.adapters.layers import AdaptedLinear, HiRALinear, LoRALinear
from qbara.errors import QbaraError
from qbara.targets import linear_layer_names, set_submodule


def lora_parameter_count(d_out: int, d_in: int, rank: int) -> int:
    """Trainable parameters of plain LoRA at `rank`: r (d_in + d_out)."""
    return rank * (d_in + d_out)


def auto_pool_out(d_out: int, d_in: int, pool_in: int, rank: int, multiple_of: int = 1) -> int:
    """QA-HiRA's output repetition whose parameter count (d_out / p)(d_in / pool_in) is closest to LoRA's
    at `rank` (ties: fewer parameters); only divisors of d_out that are multiples of `multiple_of`."""
    target = lora_parameter_count(d_out, d_in, rank)
    candidates = [p for p in range(multiple_of, d_out + 1, multiple_of) if d_out % p == 0]
    if not candidates:
        raise QbaraError(f"no output repetition divides {d_out} and is a multiple of {multiple_of}")
    return min(candidates, key=lambda p: (abs((d_out // p) * (d_in // pool_in) - target), -p))


def build_adapter(base: nn.Module, config: AdapterConfig, name: str = "layer") -> AdaptedLinear:
    """The adapter layer for `base` (a QuantizedLinear or an nn.Linear) described by `config`."""
    quant = getattr(base, "quant_config", None)
    s, drop = config.scaling, config.dropout
    if config.method == "lora":
        return LoRALinear(base, config.rank, s, dropout=drop, method="lora", name=name)
    if config.method == "qbara":
        return LoRALinear(base, config.pool * config.rank, s, config.pool, config.pool, drop, "qbara", name)
    group = quant.block_size if quant is not None else None
    if config.method == "qalora":
        pool_in = config.pool_in or group
        if pool_in is None:
            raise QbaraError(f"{name}: qalora pools by the base's group size, but this layer is not quantized; "
                             f"quantize it (prepare with a QuantConfig) or set pool_in")
        return LoRALinear(base, config.rank, s, pool_in, 1, drop, "qalora", name)
    # qahira
    pool_in = config.pool_in or group
    if pool_in is None:
        raise QbaraError(f"{name}: qahira's default pool_in is the base's group size, but this layer is not "
                         f"quantized; quantize it or set pool_in")
    if base.in_features % pool_in:
        raise QbaraError(f"{name}: qahira input pooling {pool_in} does not divide the layer's "
                         f"{base.in_features} features; choose a pool_in that divides {base.in_features}")
    rows = quant.block_rows if quant is not None and quant.kind == "int" else 1
    pool_out = config.pool_out or auto_pool_out(base.out_features, base.in_features, pool_in, config.rank, rows)
    return HiRALinear(base, s, pool_in, pool_out, drop, name)


def attach_adapters(model: nn.Module, config: AdapterConfig,
                    factors: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> nn.Module:
    """Wrap every target linear of `model` in its adapter layer, in place; only adapters train.

    With init 'lq' / 'loftq', `factors` (name -> (L1, L2), from `qbara.lq.quantize_with_factors`, which
    also quantizes the layers to match) start each LoRA at s·B A = L1 L2.
    """
    if config.init != "default" and factors is None:
        raise QbaraError(f"init={config.init!r} starts LoRA from a decomposition of the dense weights: use "
                         f"qbara.prepare(dense_model, quant, adapter) or qbara.lq_prepare, not attach_adapters "
                         f"on its own")
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
    model.qbara_adapter_config = config
    from qbara.models.quantized_io import enable_native_save

    return enable_native_save(model)


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Name -> adapter layer, for every adapted linear of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
