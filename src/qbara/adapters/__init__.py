"""Adapters on quantized bases: LoRA/QLoRA, QA-LoRA, Q-BaRA, QA-HiRA, with exact merging."""
from qbara.adapters.attach import adapter_layers, attach_adapters, trainable_parameter_count
from qbara.adapters.config import AdapterConfig
from qbara.adapters.io import load_adapter, save_adapter
from qbara.adapters.merging import merge

__all__ = ["AdapterConfig", "adapter_layers", "attach_adapters", "load_adapter", "merge", "save_adapter",
           "trainable_parameter_count"]
