"""Quantization core: format registry (`formats`), NF-k / INT-k / GGML primitives, `QuantConfig`, `quantize`."""
from qbara.quant.config import QuantConfig
from qbara.quant.double_quant import double_dequantize, double_quantize
from qbara.quant.intk import dequantize_int, quantize_int
from qbara.quant.nf import dequantize_nf, nf_levels, quantize_nf
from qbara.quant.packing import pack_bits, packed_nbytes, unpack_bits
from qbara.quant.tensor import QuantizedTensor, dequantize, quantize

__all__ = [
    "QuantConfig", "QuantizedTensor", "quantize", "dequantize", "nf_levels", "quantize_nf",
    "dequantize_nf", "quantize_int", "dequantize_int", "double_quantize", "double_dequantize", "pack_bits",
    "unpack_bits", "packed_nbytes",
]
