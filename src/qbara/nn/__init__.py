"""Modules: the quantized linear layer and the adapters on top of it."""
from qbara.nn.quantized_linear import QuantizedLinear

__all__ = ["QuantizedLinear"]
