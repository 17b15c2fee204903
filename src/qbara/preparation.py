"""`prepare`: the one entry that quantizes a causal LM and attaches adapters, QLoRA-style with a QuantConfig or
LQ-LoRA / LoftQ with an `LQConfig`; `lq_prepare`, `AdapterConfig(init=...)` and `gptq_prepare` (GPTQ on calibration
text first) are forms of it. Examples: docs/methods.md."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from qbara.adapters.attach import attach_adapters
from qbara.adapters.config import AdapterConfig
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lq.config import LQConfig
from qbara.lq.decompose import LQ_PATIENCE
from qbara.models.gptq import DEFAULT_LENGTH, DEFAULT_SAMPLES, gptq_calibration, gptq_quantize_model
from qbara.models.lq import build_lq_model
from qbara.models.streaming import quantize_model
from qbara.nn.bnb import adopt_bnb, bnb_layers
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.targets import ALL_LINEAR, linear_layer_names

__all__ = ["prepare", "lq_prepare", "gptq_prepare"]


def prepare(model: nn.Module | str | Path, quant: QuantConfig | Mapping[str, QuantConfig] | LQConfig, adapter=None,
            modules=None, progress: bool = False, factor_format: QuantConfig | None = None) -> nn.Module:
    """Quantize the target linears of `model` (in place) and attach adapters; only adapters stay trainable.
    model: a loaded model or (with an LQConfig) a safetensors folder / "smollm2-135m", streamed. quant: a QuantConfig,
    layer name -> QuantConfig, or an `LQConfig`. modules: default all but lm_head. factor_format: with
    `AdapterConfig(init=...)`, the factors' format. Layers already quantized (or bitsandbytes NF4) get only adapters;
    a quant that differs from theirs is refused."""
    if _is_lq(quant, adapter):
        if isinstance(model, nn.Module) and bnb_layers(model):
            raise QbaraError("LQ-LoRA / LoftQ decompose the dense weights; load the model without bitsandbytes' "
                             "quantization_config")
        return build_lq_model(model, _lq_config(quant, adapter, factor_format), adapter, modules=modules,
                              progress=progress)
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


def lq_prepare(model: nn.Module | str | Path, budget: float = 2.75, rank: int = 64,
               fisher: Mapping[str, Tensor] | str | Path | None = None, *, alpha: float = 16.0, dropout: float = 0.0,
               target_modules="all-linear",
               configs: Sequence[QuantConfig] | None = None, table=None, max_iters: int = 100,
               table_iters: int | None = None, table_mode: str | None = None, seed: int = 0,
               workers: int | None = None, factor_format: QuantConfig | None = None, file_budget=None, importance=None,
               progress: bool = True, patience: int = LQ_PATIENCE) -> nn.Module:
    """LQ-LoRA: prepare(model, LQConfig(budget=budget, ...), AdapterConfig(rank=rank, ...))."""
    return prepare(model, LQConfig(budget=budget, configs=configs, fisher=fisher, max_iters=max_iters,
                                   patience=patience, table_iters=table_iters, table_mode=table_mode, table=table,
                                   seed=seed, workers=workers,
                                   factor_format=factor_format, file_budget=file_budget, importance=importance),
                   AdapterConfig(rank=rank, alpha=alpha, dropout=dropout,
                                 target_modules=target_modules), progress=progress)


def gptq_prepare(model: nn.Module, tokenizer, quant: QuantConfig | Mapping[str, QuantConfig], adapter=None, *,
                 samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH, sequences=None,
                 modules=ALL_LINEAR, progress: bool = True, **gptq_options) -> nn.Module:
    """GPTQ-LoRA: GPTQ-quantize the dense `model` in place on Shakespeare windows (`gptq_calibration`,
    or your `sequences`), then `prepare` with `adapter` (default init); gptq_options go to `gptq_quantize_model`."""
    if adapter is not None and getattr(adapter, "init", "default") != "default":
        raise QbaraError(f"adapter init={adapter.init!r} starts from a decomposition of the dense weights, which "
                         f"GPTQ replaces; use init='default' on a GPTQ base, or qbara.lq_prepare for LQ-LoRA / LoftQ")
    if sequences is None:
        sequences = gptq_calibration(tokenizer, samples, length)
    gptq_quantize_model(model, quant, sequences, modules=modules, progress=progress, **gptq_options)
    return prepare(model, quant, adapter, modules=modules, progress=progress)


def _is_lq(quant, adapter) -> bool:
    """Whether this prepare is LQ-LoRA / LoftQ: an LQConfig, or AdapterConfig(init=...)."""
    return isinstance(quant, LQConfig) or (adapter is not None and adapter.init != "default")


def _lq_config(quant, adapter, factor_format=None) -> LQConfig:
    """`quant` itself, or the LQConfig the AdapterConfig(init=...) alias stands for."""
    if isinstance(quant, LQConfig):
        if factor_format is not None:
            raise QbaraError("with an LQConfig, set factor_format in it: LQConfig(..., factor_format=...)")
        return quant
    if isinstance(quant, (QuantConfig, Mapping)):
        return LQConfig(configs=quant, method=adapter.init, factor_format=factor_format,
                        loftq_iters=adapter.loftq_iters if adapter.init == "loftq" else 1)
    raise QbaraError(f"quant must be a QuantConfig, a mapping of layer name to QuantConfig or an LQConfig, got "
                     f"{type(quant).__name__}")


def _quantized_already(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], modules) -> bool:
    """Whether every target already is a QuantizedLinear of `quant`'s config (another config raises)."""
    if isinstance(quant, Mapping):  # per-layer configs: every named layer must already be quantized with its own
        modules_by_name = dict(model.named_modules())
        return bool(quant) and all(isinstance(modules_by_name.get(n), QuantizedLinear)
                                   and modules_by_name[n].quant_config == c for n, c in quant.items())
    names = linear_layer_names(model, modules)
    layers = {n: model.get_submodule(n) for n in names}
    if not all(isinstance(m, QuantizedLinear) for m in layers.values()):
        return False
    differ = [n for n, m in layers.items() if quant != m.quant_config]
    if differ:
        have = layers[differ[0]].quant_config.label
        raise QbaraError(f"{differ[0]} is already quantized as {have}, not {_describe(quant)}; pass the quant the "
                         f"model was quantized with (its qbara_quant.json), or load the dense model")
    return True


def _describe(quant) -> str:
    return quant.label if isinstance(quant, QuantConfig) else f"{len(quant)} per-layer configs"
