"""Adapters on quantized bases: LoRA/QLoRA, QA-LoRA, Q-BaRA, QA-HiRA, with exact merging."""
from qbara.adapters.attach import adapter_layers, attach_adapters, build_adapter, trainable_parameter_count
from qbara.adapters.config import METHODS, AdapterConfig
from qbara.adapters.io import load_adapter, save_adapter
from qbara.adapters.layers import AdaptedLinear, HiRALinear, LoRALinear
from qbara.adapters.merge import merge

__all__ = ["AdapterConfig", "METHODS", "AdaptedLinear", "LoRALinear", "HiRALinear", "attach_adapters",
           "build_adapter", "adapter_layers", "trainable_parameter_count", "merge", "save_adapter", "load_adapter"]
