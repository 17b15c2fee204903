"""Adapters on quantized bases: LoRA/QLoRA, QA-LoRA, Q-BaRA, QA-HiRA, with exact merging."""
from qbara.adapters.attach import adapter_layers, attach_adapters, trainable_parameter_count
from qbara.adapters.base import AdaptedLinear
from qbara.adapters.config import AdapterConfig
from qbara.adapters.io import load_adapter, save_adapter
from qbara.adapters.lora import LoRALinear
from qbara.adapters.merging import merge
from qbara.adapters.methods import METHODS, build_adapter
from qbara.adapters.qahira import HiRALinear
from qbara.adapters.qalora import QALoRALinear
from qbara.adapters.qbara import QBaRALinear

__all__ = ["AdapterConfig", "METHODS", "AdaptedLinear", "LoRALinear", "QALoRALinear", "QBaRALinear", "HiRALinear",
           "attach_adapters", "build_adapter", "adapter_layers", "trainable_parameter_count", "merge", "save_adapter",
           "load_adapter"]
