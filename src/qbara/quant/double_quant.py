"""Double quantization of absmax scales, LQ-LoRA's configurable form (arXiv 2311.12023): one fp32 offset per
matrix (the smallest scale), shifted scales as `bits`-bit codes in groups of `group_size`, group max in `dtype`."""
from __future__ import annotations

import torch
from torch import Tensor

DQ_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def double_quantize(scales: Tensor, bits: int, group_size: int, dtype: str) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 per scale, group max in `dtype` per group, offset fp32 scalar)."""
    scales = scales.float()
    n = scales.numel()
    offset = scales.min()
    shifted = torch.nn.functional.pad(scales - offset, (0, (-n) % group_size)).view(-1, group_size)
    group_max = shifted.amax(dim=1).to(DQ_DTYPES[dtype])
    gmax = group_max.float()
    qmax = 2**bits - 1
    safe = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    codes = torch.round(shifted / safe[:, None] * qmax).clamp_(0, qmax).to(torch.uint8)
    return codes.reshape(-1)[:n], group_max, offset.reshape(1)


def double_dequantize(codes: Tensor, group_max: Tensor, offset: Tensor, bits: int, group_size: int) -> Tensor:
    """fp32 scales: code / (2**bits - 1) * group max + offset."""
    n = codes.numel()
    padded = torch.nn.functional.pad(codes.float(), (0, (-n) % group_size)).view(-1, group_size)
    values = padded / (2**bits - 1) * group_max.float()[:, None] + offset.float()
    return values.reshape(-1)[:n]


def stored_scales(scales: Tensor, bits: int, group_size: int, dtype: str) -> Tensor:
    """The fp32 scales a double-quantized tensor stores (quantize, then dequantize)."""
    codes, group_max, offset = double_quantize(scales, bits, group_size, dtype)
    return double_dequantize(codes, group_max, offset, bits, group_size)
