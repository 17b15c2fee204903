"""INT-k asymmetric (min-max) quantization, w = s * q + m, fp16 scale and float minimum per block of
`group_rows` x `group_size` (1 x G per-row groups; taller tiles for QA-HiRA's 2-D pooling)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from qbara.quant.packing import check_out, unpack_lookup


def to_blocks(weight: Tensor, group_size: int, group_rows: int) -> Tensor:
    """(n_blocks, group_rows * group_size): the weight's tiles, row-block major, one per row."""
    d_out, d_in = weight.shape
    tiles = weight.reshape(d_out // group_rows, group_rows, d_in // group_size, group_size)
    return tiles.permute(0, 2, 1, 3).reshape(-1, group_rows * group_size)


def _from_blocks(blocks: Tensor, shape: tuple[int, int], group_size: int, group_rows: int) -> Tensor:
    d_out, d_in = shape
    tiles = blocks.reshape(d_out // group_rows, d_in // group_size, group_rows, group_size)
    return tiles.permute(0, 2, 1, 3).reshape(d_out, d_in)


def quantize_int(weight: Tensor, bits: int, group_size: int, group_rows: int = 1,
                 minimum_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 row-major, scale fp16, minimum in `minimum_dtype`) per block, blocks as `to_blocks` orders them."""
    blocks = to_blocks(weight.detach().float(), group_size, group_rows)
    lo = blocks.amin(dim=1)
    hi = blocks.amax(dim=1)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).to(torch.float16)
    minimum = lo.to(minimum_dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((blocks - minimum.float()[:, None]) / safe[:, None]).clamp_(0, qmax)
    codes = torch.where(s[:, None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    return _from_blocks(codes, weight.shape, group_size, group_rows).reshape(-1), scale, minimum


@functools.lru_cache(maxsize=None)
def _int_code_table(bits: int, device: torch.device) -> Tensor:
    return torch.arange(2 ** bits, dtype=torch.float32, device=device)


def dequantize_int(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int], group_size: int,
                   group_rows: int = 1, dtype=torch.float32, *, bits: int | None = None,
                   out: Tensor | None = None) -> Tensor:
    """The (d_out, d_in) weight s * q + m, computed in fp32. `bits`: `codes` is the `pack_bits` buffer (read
    without unpacking). `out`: a flat fp32 buffer to write into (`dtype` must be fp32), returned as `shape`."""
    check_out(out, dtype)
    if bits is not None:  # fp32 codes of this call's own (or in `out`)
        codes = unpack_lookup(codes, bits, shape[0] * shape[1], _int_code_table(bits, codes.device), out=out)
    blocks = to_blocks(codes.reshape(shape), group_size, group_rows)
    if bits is None:
        blocks = blocks.to(torch.float32, copy=True)  # the caller's codes are never written to
    # In place, two passes (faster than addcmul's kernel with per-block operands). q * s is exact in fp32
    # (q < 2**8, s an fp16 value), so only the add rounds: the same bits as addcmul, with or without FMA.
    blocks.mul_(scale.float()[:, None]).add_(minimum.float()[:, None])
    weight = _from_blocks(blocks, shape, group_size, group_rows)
    if out is not None and weight.data_ptr() != out.data_ptr():  # 2-D tiles, or a layout unpack_lookup cannot
        weight = out.view(shape).copy_(weight)                    # write into `out`
    return weight.to(dtype)
