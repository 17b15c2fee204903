"""Models loaded by transformers with bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True)`): found, and their
NF4 layers adopted into qbara's NF4 `QuantizedLinear` without changing a single weight.

bitsandbytes' NF4 is block-wise absmax with the same 16 levels as qbara's; its dequantized weight w = level ·
absmax re-quantizes to the same codes and the same absmax (the block's largest |w| is absmax itself), so a
qbara NF4 layer with fp32 absmax (`double_quant=False`) holds exactly bitsandbytes' dequantized weights.
"""
from __future__ import annotations

import torch
from torch import nn

from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> bitsandbytes linear layer (Linear4bit, Linear8bitLt, ...), without importing bitsandbytes."""
    return {n: m for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}


def adoption_config(model: nn.Module) -> QuantConfig:
    """The qbara config that holds this bitsandbytes model's weights exactly (its NF4 block size, fp32 absmax);
    refuses 8-bit and FP4 layers with the fix."""
    sizes = set()
    for name, layer in bnb_layers(model).items():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if state is None or getattr(state, "quant_type", None) != "nf4":
            kind = getattr(state, "quant_type", None) or type(layer).__name__
            raise QbaraError(f"{name} was loaded by bitsandbytes as {kind}, which qbara cannot take over; load the "
                             f"model without quantization_config (qbara quantizes it itself, e.g. "
                             f"QuantConfig('nf4') or QuantConfig('int4', 32))")
        sizes.add(int(state.blocksize))
    if len(sizes) != 1:
        raise QbaraError(f"the bitsandbytes layers use several block sizes {sorted(sizes)}; load the model without "
                         f"quantization_config and let qbara quantize it")
    return QuantConfig("nf4", block_size=sizes.pop(), double_quant=False)


def _canonical_layout(layer) -> None:
    """Undo bitsandbytes' CPU repacking in place. bitsandbytes >= 0.50 repacks a CPU layer for its AVX512-BF16
    kernel at the first eval-mode no-grad forward (`quant_state.packing_format_for_cpu`): codes in another order,
    absmax as a (in/block, out) bf16 matrix. Its own save path (`_save_to_state_dict`) restores the codes but,
    without double quantization, leaves absmax transposed, which `dequantize_4bit` would read in the wrong order.
    What comes back is bnb's weights as its kernel computes with them (absmax rounded to bf16 by the repacking)."""
    state = layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return
    layer.state_dict()
    state = layer.weight.quant_state  # the restored state bitsandbytes put in place
    if not getattr(state, "nested", False) and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float()


@torch.no_grad()
def adopt_bnb(model: nn.Module, quant=None) -> nn.Module:
    """Replace every bitsandbytes NF4 layer of `model` by a qbara NF4 QuantizedLinear holding the same
    dequantized weights, in place. `quant`, if given, must be that config (see `adoption_config`)."""
    import bitsandbytes.functional as bnbf

    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.targets import set_submodule

    config = adoption_config(model)
    if quant is not None and quant != config:
        raise QbaraError(f"the model was loaded with bitsandbytes NF4 (block {config.block_size}); qbara takes its "
                         f"layers over exactly as QuantConfig('nf4', block_size={config.block_size}, "
                         f"double_quant=False), not {quant.label}: pass that config, or load the model without "
                         f"quantization_config to quantize it as {quant.label}")
    for name, layer in bnb_layers(model).items():
        _canonical_layout(layer)
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device)
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.float())
        set_submodule(model, name, QuantizedLinear.from_linear(dense, config, name=name))
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "config") and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model
