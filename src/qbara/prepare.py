"""`prepare`: quantize the linear layers of a causal LM and attach adapters."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from tqdm.auto import tqdm

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.targets import ALL_LINEAR, linear_layer_names, set_submodule


def quantize_model(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig],
                   modules=ALL_LINEAR, progress: bool = False) -> nn.Module:
    """Replace the selected nn.Linear layers (all but lm_head by default) by QuantizedLinear, in place.

    `quant` is one config for every layer, or a mapping from layer name to config (as LQ-LoRA's
    allocation produces); with a mapping, exactly the layers it names are quantized.
    """
    if isinstance(quant, QuantConfig):
        names = linear_layer_names(model, modules, include_quantized=False)
        per_layer = {n: quant for n in names}
    elif isinstance(quant, Mapping):
        per_layer = dict(quant)
        linears = set(linear_layer_names(model, ALL_LINEAR, include_quantized=False))
        missing = sorted(set(per_layer) - linears)
        if missing:
            raise QbaraError(f"quantization configs name layers that are not linear layers of this model: "
                             f"{missing[:5]}; use names from model.named_modules()")
    else:
        raise QbaraError(f"quant must be a QuantConfig or a mapping of layer name to QuantConfig, got "
                         f"{type(quant).__name__}")
    # Validate every layer first, so a bad block size fails before any layer is replaced.
    for name, config in per_layer.items():
        config.check_shape(tuple(model.get_submodule(name).weight.shape), name)
    for name, config in tqdm(per_layer.items(), desc="quantizing", disable=not progress, leave=False):
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantizedLinear.from_linear(linear, config, name=name))
    return model


def prepare(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], adapter=None,
            modules=ALL_LINEAR, progress: bool = False) -> nn.Module:
    """Quantize the target linears of `model` (in place) and attach adapters; freeze everything else.

    Only adapter parameters are left trainable. Returns the model.
    """
    if not hasattr(model, "qbara_base_fingerprint") and hasattr(model, "config"):
        from qbara.models.loader import model_fingerprint

        model.qbara_base_fingerprint = model_fingerprint(model)
    for p in model.parameters():
        p.requires_grad_(False)
    quantize_model(model, quant, modules=modules, progress=progress)
    if adapter is not None:
        from qbara.adapters.attach import attach_adapters

        attach_adapters(model, adapter)
    return model
