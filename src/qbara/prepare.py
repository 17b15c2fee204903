"""`prepare`: quantize the linear layers of a causal LM and attach adapters."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from tqdm.auto import tqdm

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.targets import ALL_LINEAR, layer_configs, linear_layer_names, set_submodule


def quantize_model(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig],
                   modules=ALL_LINEAR, progress: bool = False) -> nn.Module:
    """Replace the selected nn.Linear layers (all but lm_head by default) by QuantizedLinear, in place.

    `quant` is one config for every layer, or a mapping from layer name to config (as LQ-LoRA's
    allocation produces); with a mapping, exactly the layers it names are quantized.
    """
    from qbara.models.quantized_io import enable_native_save

    per_layer = layer_configs(model, quant, modules)
    for name, config in tqdm(per_layer.items(), desc="quantizing", disable=not progress, leave=False):
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantizedLinear.from_linear(linear, config, name=name))
    return enable_native_save(model)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear of `model` by an fp32 nn.Linear holding its dequantized weight, in place
    (the inverse of `quantize_model` up to the quantization error); adapters must be merged first."""
    from qbara.adapters import adapter_layers

    if adapter_layers(model):
        raise QbaraError("this model still has adapters: merge them first (qbara.merge(model, into='dense')), "
                         "then dequantize")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            set_submodule(model, name, module.to_linear())
    return model


def prepare(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], adapter=None,
            modules=ALL_LINEAR, progress: bool = False, factor_format: QuantConfig | None = None) -> nn.Module:
    """Quantize the target linears of `model` (in place) and attach adapters; freeze everything else.

    Only adapter parameters are left trainable. factor_format: with a LoftQ / LQ init, the factors the adapters
    start from stored in this format (`qbara.lq.factors.FACTOR_CONFIG`: NF8), the total bits recorded. Returns the
    model. A model loaded with bitsandbytes NF4 has its layers taken over as they are (`qbara.models.bnb`; quant
    must then be the matching NF4 config). A model whose target layers are all quantized already (a loaded
    quantized folder, e.g. a GPTQ base) gets only the adapters; a quant that differs from theirs is refused.
    """
    from qbara.models.bnb import adopt_bnb, bnb_layers

    adopted = bool(bnb_layers(model))
    if adopted:
        if not isinstance(quant, QuantConfig):
            raise QbaraError("per-layer configs need the dense weights; load the model without bitsandbytes' "
                             "quantization_config")
        adopt_bnb(model, quant)
    if not hasattr(model, "qbara_base_fingerprint") and hasattr(model, "config"):
        from qbara.fingerprint import model_fingerprint

        model.qbara_base_fingerprint = model_fingerprint(model)
    for p in model.parameters():
        p.requires_grad_(False)
    factors = None
    if adapter is not None and adapter.init != "default":
        # LoftQ / LQ-LoRA: Q is the quantized part of a decomposition W ≈ Q + L1 L2, not quantize(W).
        from qbara.fingerprint import model_fingerprint
        from qbara.lq.prepare import quantize_with_factors

        per_layer = layer_configs(model, quant, modules)
        targets = linear_layer_names(model, adapter.target_modules, include_quantized=False)
        unquantized = [n for n in targets if n not in per_layer]
        if unquantized:
            raise QbaraError(f"init={adapter.init!r} needs every adapter target quantized, but {unquantized[:3]} "
                             f"are not; quantize them too or narrow target_modules")
        factors = quantize_with_factors(model, {n: per_layer[n] for n in targets}, adapter.rank,
                                        method=adapter.init, loftq_iters=adapter.loftq_iters, progress=progress)
        if factor_format is not None:
            from qbara.lq.factors import store_factors

            factors = store_factors(model.qbara_lq, factors, factor_format)
        rest = {n: c for n, c in per_layer.items() if n not in factors}
        if rest:
            quantize_model(model, rest, progress=progress)
            model.qbara_base_fingerprint = model_fingerprint(model)  # of the final quantized base
    elif getattr(model, "qbara_loaded_quant", None) is not None:  # quantized on load
        if model.qbara_loaded_quant != quant:
            raise QbaraError(f"this model was quantized on load with {_describe(model.qbara_loaded_quant)}; pass the "
                             f"same quant to prepare, or load it without quant=")
    elif not adopted and not _quantized_already(model, quant, modules):  # bnb layers, adopted, are the base
        quantize_model(model, quant, modules=modules, progress=progress)
    if adapter is not None:
        from qbara.adapters.attach import attach_adapters

        attach_adapters(model, adapter, factors=factors)
    return model


def _quantized_already(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], modules) -> bool:
    """True when every target linear is already a QuantizedLinear with the config `quant` gives it (a loaded
    quantized folder, e.g. a GPTQ base): then only the adapters are attached. A config that differs raises."""
    if isinstance(quant, Mapping):  # per-layer configs: every named layer must already be quantized with its own
        modules_by_name = dict(model.named_modules())
        return bool(quant) and all(isinstance(modules_by_name.get(n), QuantizedLinear)
                                   and modules_by_name[n].quant_config == c for n, c in quant.items())
    names = linear_layer_names(model, modules)
    layers = {n: model.get_submodule(n) for n in names}
    if not all(isinstance(m, QuantizedLinear) for m in layers.values()):
        return False
    wanted = quant if isinstance(quant, Mapping) else {n: quant for n in names}
    differ = [n for n, m in layers.items() if wanted.get(n) != m.quant_config]
    if differ:
        have = layers[differ[0]].quant_config.label
        raise QbaraError(f"{differ[0]} is already quantized as {have}, not {_describe(quant)}; pass the quant the "
                         f"model was quantized with (its qbara_quant.json), or load the dense model")
    return True


def _describe(quant) -> str:
    return quant.label if isinstance(quant, QuantConfig) else f"{len(quant)} per-layer configs"
