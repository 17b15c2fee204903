"""qbara's `QuantizedLinear` as a PEFT LoRA target through PEFT's custom-module registration (usage:
docs/python-api.md); PEFT saves, loads and trains the layer as its own. It also runs PEFT's QA-LoRA (which PEFT
runs on GPTQ layers only) on qbara layers and plain `nn.Linear`. Merging stays in qbara (packed weights)."""
from __future__ import annotations

import torch
from torch import nn

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear


def register_with_peft(config, model: nn.Module | None = None):
    """Register qbara's LoRA layer on the PEFT LoraConfig `config` and return it; `model` resolves "all-linear"."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise QbaraError("register_with_peft needs PEFT: pip install peft") from None
    if not isinstance(config, LoraConfig):
        raise QbaraError(f"register_with_peft takes a peft.LoraConfig, got {type(config).__name__}; qbara's "
                         f"quantized layers take LoRA adapters only")
    if _is_all_linear(config.target_modules):
        config.target_modules = all_linear_targets(model)
    mapping = {QuantizedLinear: _layer_class()}
    if getattr(config, "use_qalora", False):
        mapping[nn.Linear] = _layer_class()
    config._register_custom_module(mapping)  # PEFT's (experimental) public hook for custom layer types
    return config


def _is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == "all-linear"


def all_linear_targets(model: nn.Module | None) -> list[str]:
    """PEFT's "all-linear" for a qbara model (PEFT alone finds only nn.Linear): the last name components of its
    linear layers but the output head when they select exactly those, else their full names."""
    if model is None:
        raise QbaraError("target_modules='all-linear' needs the model: PEFT resolves it to nn.Linear layers only and "
                         "finds none of qbara's quantized ones; call register_with_peft(config, model), or list the "
                         "modules (e.g. target_modules=['q_proj', 'v_proj'])")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    chosen = [name for name in linear if model.get_submodule(name) is not output]
    if not chosen:
        raise QbaraError("target_modules='all-linear': the model has no linear layer but its output head; "
                         "list the modules to adapt")
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    selected = [name for name in linear if name.rsplit(".", 1)[-1] in suffixes]
    return suffixes if selected == chosen else chosen


_LAYER = None


def _layer_class():
    """The PEFT LoRA layer class, built on first use so importing qbara never imports PEFT."""
    global _LAYER
    if _LAYER is None:
        _LAYER = _build_layer_class()
    return _LAYER


def _build_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    class QbaraLoraLinear(nn.Module, LoraLayer):
        """PEFT LoRA (optionally QA-LoRA) on a qbara QuantizedLinear or a plain nn.Linear base."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer):
            # adapters stay fp32 on the base's device (PEFT would read `qweight`, a packed QuantizedTensor here)
            tensor = next(iter(base_layer.buffers()), None)
            if tensor is None:
                tensor = next(base_layer.parameters())
            return tensor.device, None

        def resolve_lora_variant(self, *, config, **kwargs):
            if config.use_qalora:
                if config.use_dora:
                    raise QbaraError("DoRA and QA-LoRA at once are not supported; choose one of use_dora, use_qalora")
                from peft.tuners.lora.variants import QALoraLinearVariant

                return QALoraLinearVariant()
            try:  # plain LoRA only: PEFT raises for any other variant (DoRA, aLoRA, ...)
                return LoraLayer.resolve_lora_variant(self, config=config, **kwargs)
            except ValueError as err:
                raise QbaraError(f"qbara's quantized layer takes plain LoRA or QA-LoRA only ({err}); turn the "
                                 f"other LoRA variant off in the LoraConfig") from None

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise QbaraError("PEFT cannot merge into qbara's quantized layer; save the adapter "
                             "(save_pretrained), load it with qbara.load_adapter and use qbara.merge or "
                             "`qbara export`")

        def unmerge(self) -> None:
            pass  # never merged

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if kwargs.get("adapter_names") is not None:
                raise QbaraError("mixed-adapter batches (adapter_names) are not supported on qbara layers; "
                                 "activate one adapter with set_adapter")
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            out_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                if name in self.lora_variant:
                    result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
                else:
                    result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result.to(out_dtype)
            return result

        def __repr__(self) -> str:
            return "qbara.lora." + super().__repr__()

    return QbaraLoraLinear
