"""Models loaded by transformers with bitsandbytes (`load_in_4bit=True`): their NF4 layers adopted as qbara
`QuantizedLinear`s, weights unchanged (fp32 absmax, or bitsandbytes' double-quantized buffers as dq_style="bnb")."""
from __future__ import annotations

import torch
from torch import nn

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.dq_bnb import DYNAMIC_BLOCK, dynamic_map
from qbara.quant.formats.base import BNB_BLOCK_SIZES
from qbara.quant.tensor import QuantizedTensor


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> bitsandbytes linear layer (Linear4bit, Linear8bitLt, ...), without importing bitsandbytes."""
    return {n: m for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}


def adoption_config(model: nn.Module) -> QuantConfig:
    """The qbara config holding this model's bitsandbytes layers exactly (NF4 at its block size, fp32 absmax or
    dq_style="bnb"). Restores CPU-repacked layers to their canonical layout first; refuses 8-bit and FP4 layers."""
    configs = set()
    for name, layer in bnb_layers(model).items():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if state is None or getattr(state, "quant_type", None) != "nf4":
            kind = getattr(state, "quant_type", None) or type(layer).__name__
            raise QbaraError(f"{name} was loaded by bitsandbytes as {kind}, which qbara cannot take over; load the "
                             f"model without quantization_config (qbara quantizes it itself, e.g. "
                             f"QuantConfig('nf4') or QuantConfig('int4', 32))")
        _canonical_layout(layer)
        configs.add(_layer_config(layer.weight.quant_state))
    if len(configs) != 1:
        raise QbaraError(f"the bitsandbytes layers use several layouts ({', '.join(sorted(c.label for c in configs))})"
                         f"; load the model without quantization_config and let qbara quantize it")
    return configs.pop()


def _layer_config(state) -> QuantConfig:
    """NF4 with bitsandbytes' double quantization where its scales are in that layout, else fp32 absmax."""
    block = int(state.blocksize)
    if getattr(state, "nested", False) and block in BNB_BLOCK_SIZES and _standard_nesting(state):
        return QuantConfig("nf4", block_size=block, dq_style="bnb")
    return QuantConfig("nf4", block_size=block, double_quant=False)


def _standard_nesting(state) -> bool:
    """The scales are `compress_statistics`' layout (dynamic-map uint8 codes in blocks of 256, fp32 nested absmax)."""
    nested = state.state2
    return (state.absmax.dtype == torch.uint8 and nested.absmax.dtype == torch.float32
            and int(nested.blocksize) == DYNAMIC_BLOCK and torch.equal(nested.code.float().cpu(), dynamic_map()))


def _canonical_layout(layer) -> None:
    """Undo bitsandbytes' (>= 0.50) CPU repacking in place, including the absmax its save path leaves transposed;
    the weights are then bnb's as its kernel uses them (absmax rounded to bf16)."""
    state = layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return
    layer.state_dict()
    state = layer.weight.quant_state  # the restored state bitsandbytes put in place
    if not getattr(state, "nested", False) and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float()


@torch.no_grad()
def adopt_bnb(model: nn.Module, quant=None) -> nn.Module:
    """Replace every bitsandbytes NF4 layer of `model` in place by a qbara QuantizedLinear with the same weights;
    `quant`, if given, must be a config that holds them (`adoption_config`, or fp32 absmax)."""
    config = _chosen_config(adoption_config(model), quant)
    for name, layer in bnb_layers(model).items():
        adopt = _adopt_buffers if config.dq_style == "bnb" else _adopt_dense
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, adopt(layer, config, name))
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "config") and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def _chosen_config(exact: QuantConfig, quant: QuantConfig | None) -> QuantConfig:
    plain = QuantConfig("nf4", block_size=exact.block_size, double_quant=False)
    if quant is None or quant in (exact, plain):
        return exact if quant is None else quant
    options = " or ".join(_spelled(c) for c in dict.fromkeys([exact, plain]))
    raise QbaraError(f"the model was loaded with bitsandbytes NF4 ({exact.label}); qbara takes its layers over "
                     f"exactly as {options}, not {quant.label}: pass that config, or load the model without "
                     f"quantization_config to quantize it as {quant.label}")


def _spelled(config: QuantConfig) -> str:
    if config.dq_style == "bnb":
        return f"QuantConfig('nf4', block_size={config.block_size}, dq_style='bnb')"
    return f"QuantConfig('nf4', block_size={config.block_size}, double_quant=False)"


def _adopt_dense(layer, config: QuantConfig, name: str):
    """bitsandbytes' dequantized weight re-quantized with `config` (fp32 absmax: the same weights)."""
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device)
    dense.weight.copy_(weight)
    if layer.bias is not None:
        dense.bias.copy_(layer.bias.float())
    return QuantizedLinear.from_linear(dense, config, name=name)


def _adopt_buffers(layer, config: QuantConfig, name: str):
    state = layer.weight.quant_state
    shape = (int(state.shape[0]), int(state.shape[1]))
    config.check_shape(shape, name)
    tensors = {"codes": layer.weight.data.reshape(-1).view(torch.uint8).clone(),
               "absmax_codes": state.absmax.reshape(-1).clone(),
               "nested_absmax": state.state2.absmax.reshape(-1).clone(),
               "absmax_offset": state.offset.float().reshape(1).clone()}
    n_blocks = shape[0] * shape[1] // config.block_size
    sizes = {"codes": shape[0] * shape[1] // 2, "absmax_codes": n_blocks,
             "nested_absmax": -(-n_blocks // DYNAMIC_BLOCK), "absmax_offset": 1}
    wrong = [k for k, v in sizes.items() if tensors[k].numel() != v]
    if wrong:
        raise QbaraError(f"{name}: bitsandbytes' {wrong[0]} holds {tensors[wrong[0]].numel()} values, not the "
                         f"{sizes[wrong[0]]} of a {shape[0]}x{shape[1]} NF4 weight; load the model without "
                         f"quantization_config and let qbara quantize it")
    bias = None if layer.bias is None else layer.bias.detach().float()
    return QuantizedLinear(QuantizedTensor(config, shape, tensors), bias)
