"""qbara: fine-tune quantized LLMs (Q-BaRA, QA-HiRA, LQ-LoRA, QLoRA, QA-LoRA) and ship them low-bit.

The whole public API is below (`__all__`); docs/python-api.md walks through it and docs/architecture.md shows how
the package is laid out."""
from qbara.adapters import AdapterConfig, load_adapter, merge, save_adapter
from qbara.errors import QbaraError
from qbara.export import export_gguf, export_gguf_lora, export_hf
from qbara.lq.config import LQConfig
from qbara.models import load_model, model_fingerprint
from qbara.models.gptq import gptq_quantize_model
from qbara.models.streaming import dequantize_model, quantize_model
from qbara.native import save_quantized
from qbara.nn import QuantizedLinear
from qbara.nn.peft_support import register_with_peft
from qbara.preparation import gptq_prepare, lq_prepare, prepare
from qbara.pretrained import from_pretrained
from qbara.quant import QuantConfig, QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    # configs
    "QuantConfig", "AdapterConfig", "LQConfig",
    # load and prepare a model
    "load_model", "from_pretrained", "prepare", "lq_prepare", "gptq_prepare",
    # adapters
    "save_adapter", "load_adapter", "merge", "register_with_peft",
    # save and ship
    "save_quantized", "export_gguf", "export_gguf_lora", "export_hf",
    # lower level: quantize tensors and models
    "quantize", "dequantize", "QuantizedTensor", "QuantizedLinear", "quantize_model", "dequantize_model",
    "gptq_quantize_model", "model_fingerprint",
    "QbaraError",
]
