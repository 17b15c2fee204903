"""qbara: fine-tune quantized LLMs (Q-BaRA, QA-HiRA, LQ-LoRA, QLoRA, QA-LoRA) and ship them low-bit."""
from qbara.adapters import AdapterConfig, load_adapter, merge, save_adapter
from qbara.errors import QbaraError
from qbara.lq.config import LQConfig
from qbara.models import load_model, model_fingerprint
from qbara.models.gptq import gptq_quantize_model
from qbara.models.streaming import quantize_model
from qbara.nn import QuantizedLinear
from qbara.nn.peft_support import register_with_peft
from qbara.preparation import gptq_prepare, lq_prepare, prepare
from qbara.pretrained import from_pretrained
from qbara.quant import QuantConfig, QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["QbaraError", "QuantConfig", "AdapterConfig", "LQConfig", "QuantizedTensor", "QuantizedLinear", "quantize",
           "dequantize", "prepare", "quantize_model", "merge", "save_adapter", "load_adapter", "load_model",
           "model_fingerprint", "lq_prepare", "gptq_prepare", "gptq_quantize_model", "from_pretrained",
           "register_with_peft"]
