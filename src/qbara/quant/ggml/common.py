"""Float32 arithmetic that reproduces GGML's C reference quantizers bit for bit (one IEEE rounding per
operation, sums in index order, where torch's shortcuts differ), and byte helpers."""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

F32 = torch.float32
FP16_MAX = 65504.0  # the largest finite fp16: a block scale GGML stores must stay below it


def rdiv(numerator: float, tensor: Tensor) -> Tensor:
    """numerator / tensor with IEEE division (torch's `scalar / tensor` multiplies by 1/tensor)."""
    return torch.div(torch.tensor(numerator, dtype=F32, device=tensor.device), tensor)


def div(tensor: Tensor, denominator: float) -> Tensor:
    """tensor / denominator with IEEE division (CUDA turns a scalar divisor into a product)."""
    return torch.div(tensor, torch.tensor(denominator, dtype=F32, device=tensor.device))


def sqrt_f32(tensor: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt (via float64; torch's CPU float32 sqrt is not)."""
    return torch.sqrt(tensor.double()).float()


def seq_sum(rows: Tensor) -> Tensor:
    """Float32 sum over dim 0 in index order, as a C loop (numpy reduces a non-contiguous axis row by row)."""
    if rows.device.type == "cpu" and rows.is_contiguous() and rows.dtype == F32:
        return torch.from_numpy(np.add.reduce(rows.numpy(), axis=0))
    acc = rows[0].clone()
    for row in rows[1:]:
        acc += row
    return acc


def roundf(tensor: Tensor) -> Tensor:
    """C roundf: halves away from zero."""
    a = tensor.abs()
    whole = a.floor()
    return torch.copysign(whole + (2 * (a - whole)).floor(), tensor)


def nearest_int(tensor: Tensor) -> Tensor:
    """GGML's nearest_int: round half to even, as int32."""
    return torch.round(tensor).int()


def first_absmax(x: Tensor, dim: int) -> Tensor:
    """Signed value of largest magnitude along `dim` (the first on ties)."""
    index = x.abs().argmax(dim=dim, keepdim=True)
    return x.gather(dim, index).squeeze(dim)


def half_bytes(values: Tensor) -> Tensor:
    """(N,) fp16 -> (N, 2) uint8, little-endian."""
    return _le(values.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2))


def half_from_bytes(raw: Tensor) -> Tensor:
    """(N, 2) little-endian uint8 -> (N,) fp32."""
    return _le(raw.contiguous()).view(torch.float16).view(-1).float()


def _le(pairs: Tensor) -> Tensor:
    return pairs if sys.byteorder == "little" else pairs.flip(-1).contiguous()


def bits_to_bytes(bits: Tensor, dim: int) -> Tensor:
    """Bit planes -> bytes: entry b of the 8 along `dim` becomes bit b."""
    shape = [1] * bits.dim()
    shape[dim] = 8
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8).view(shape)
    return (bits.to(torch.uint8) << shifts).sum(dim=dim, dtype=torch.uint8)


def bytes_to_bits(raw: Tensor, dim: int) -> Tensor:
    """Inverse of `bits_to_bytes`: a new axis of 8 bits at `dim`."""
    raw = raw.unsqueeze(dim)
    shape = [1] * raw.dim()
    shape[dim] = 8
    shifts = torch.arange(8, device=raw.device, dtype=torch.uint8).view(shape)
    return (raw >> shifts) & 1


def iquant_search_weights(x: Tensor, qw: Tensor | None) -> Tensor:
    """The i-quants' search weights (ggml's): (N, n) rows of n weights -> (32, N * n / 32), one column per 32-block:
    x^2, or qw * sqrt(2 * mean(x^2) of the row + x^2)."""
    n = x.shape[1]
    cols = x.reshape(-1, 32).t().contiguous()
    if qw is None:
        return cols * cols
    sigma2 = seq_sum(x.t().contiguous().square_()) * (2.0 / n)  # exact: a power of two
    return qw.reshape(-1, 32).t().contiguous().mul_(sqrt_f32(sigma2.repeat_interleave(n // 32) + cols * cols))
