"""`prepare`: quantize the linear layers of a causal LM and attach adapters (QLoRA-style, or LQ-LoRA / LoftQ with an
`LQConfig`)."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from qbara.adapters.attach import attach_adapters
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lq.config import LQConfig
from qbara.models.streaming import dequantize_model, quantize_model  # noqa: F401  (re-exported)
from qbara.nn.bnb import adopt_bnb, bnb_layers
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.prepare_lq import prepare_lq
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.targets import ALL_LINEAR, linear_layer_names


def prepare(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig] | LQConfig, adapter=None,
            modules=None, progress: bool = False, factor_format: QuantConfig | None = None) -> nn.Module:
    """Quantize the target linears of `model` (in place) and attach adapters; freeze everything else.

    quant: one QuantConfig for every layer, a mapping layer name -> QuantConfig, or an `LQConfig` (LQ-LoRA /
    LoftQ: each adapter target quantized as the Q of a decomposition W ≈ Q + L1 L2 and its LoRA started from
    the factors; see `qbara.lq.LQConfig`; the top-level `qbara.prepare`, `qbara.pretrained.prepare`, then also
    takes a safetensors checkpoint folder, streamed):

        prepare(model, QuantConfig("nf4"), AdapterConfig(rank=64))                    # QLoRA
        prepare(model, LQConfig(budget=2.75), AdapterConfig(rank=64))                 # LQ-LoRA
        prepare(model, LQConfig(configs=QuantConfig("nf4"), method="loftq"), AdapterConfig(rank=64))  # LoftQ

    modules: the linears to quantize (default all but lm_head; with an LQConfig budget, the adapter targets).
    Only adapter parameters are left trainable. `AdapterConfig(init="lq" | "loftq")` with a QuantConfig (or
    mapping) is shorthand for `LQConfig(configs=quant, method=init, loftq_iters=..., factor_format=factor_format)`:
    factor_format, the factors the adapters start from stored in this format (`qbara.lq.factors.FACTOR_CONFIG`:
    NF8), the total bits recorded (with an LQConfig, set it there). Returns the model. A model loaded with
    bitsandbytes NF4 has its layers taken over as they are (`qbara.nn.bnb`; quant must then be the matching
    NF4 config). A model whose target layers are all quantized already (a loaded quantized folder, e.g. a GPTQ
    base) gets only the adapters; a quant that differs from theirs is refused.
    """
    if is_lq(quant, adapter):
        return _prepare_lq(model, quant, adapter, modules, progress, factor_format)
    if not isinstance(model, nn.Module):
        raise QbaraError(f"prepare takes a loaded model (qbara.load_model), got {type(model).__name__}; only an "
                         f"LQConfig also takes a checkpoint folder")
    modules = ALL_LINEAR if modules is None else modules
    adopted = bool(bnb_layers(model))
    if adopted:
        if not isinstance(quant, QuantConfig):
            raise QbaraError("per-layer configs need the dense weights; load the model without bitsandbytes' "
                             "quantization_config")
        adopt_bnb(model, quant)
    state = state_of(model)
    if state.base_fingerprint is None and hasattr(model, "config"):
        state.base_fingerprint = model_fingerprint(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if state.loaded_quant is not None:  # quantized on load
        if state.loaded_quant != quant:
            raise QbaraError(f"this model was quantized on load with {_describe(state.loaded_quant)}; pass the "
                             f"same quant to prepare, or load it without quant=")
    elif not adopted and not _quantized_already(model, quant, modules):  # bnb layers, adopted, are the base
        quantize_model(model, quant, modules=modules, progress=progress)
    if adapter is not None:
        attach_adapters(model, adapter)
    return model


def is_lq(quant, adapter) -> bool:
    """Whether `prepare(model, quant, adapter)` is LQ-LoRA / LoftQ: an LQConfig, or AdapterConfig(init=...)."""
    return isinstance(quant, LQConfig) or (adapter is not None and adapter.init != "default")


def _prepare_lq(model, quant, adapter, modules, progress: bool, factor_format) -> nn.Module:
    """prepare's LQ-LoRA / LoftQ case: an LQConfig, or the AdapterConfig(init=...) shorthand turned into one."""
    if isinstance(model, nn.Module) and bnb_layers(model):
        raise QbaraError("LQ-LoRA / LoftQ decompose the dense weights; load the model without bitsandbytes' "
                         "quantization_config")
    return prepare_lq(model, lq_config_for(quant, adapter, factor_format), adapter, modules=modules,
                      progress=progress)


def lq_config_for(quant, adapter, factor_format=None) -> LQConfig:
    """The LQConfig of prepare's LQ-LoRA / LoftQ case: `quant` itself, or the AdapterConfig(init=...) shorthand's."""
    if isinstance(quant, LQConfig):
        if factor_format is not None:
            raise QbaraError("with an LQConfig, set factor_format in it: LQConfig(..., factor_format=...)")
        lq = quant
    elif isinstance(quant, (QuantConfig, Mapping)):
        lq = LQConfig(configs=quant, method=adapter.init, factor_format=factor_format,
                      loftq_iters=adapter.loftq_iters if adapter.init == "loftq" else 1)
    else:
        raise QbaraError(f"quant must be a QuantConfig, a mapping of layer name to QuantConfig or an LQConfig, got "
                         f"{type(quant).__name__}")
    return lq


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
