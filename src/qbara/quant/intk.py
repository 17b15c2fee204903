"""INT-k asymmetric (min-max) quantization with float scale and float minimum per block.

A block is `group_rows` x `group_size` elements of the (d_out, d_in) weight: 1 x G is the usual
per-row group (GGUF Q4_1 / Q5_1 for 4 / 5 bits with G = 32); taller tiles serve QA-HiRA's 2-D pooling.
Scale and minimum are stored in fp16 (the minimum optionally in fp32), so w = s * q + m with float m: adding a
constant to a whole block is exact.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_blocks(weight: Tensor, group_size: int, group_rows: int) -> Tensor:
    """(n_blocks, group_rows * group_size): the weight's (group_rows x group_size) tiles, row-major, one per row."""
    d_out, d_in = weight.shape
    tiles = weight.reshape(d_out // group_rows, group_rows, d_in // group_size, group_size)
    return tiles.permute(0, 2, 1, 3).reshape(-1, group_rows * group_size)


def from_blocks(blocks: Tensor, shape: tuple[int, int], group_size: int, group_rows: int) -> Tensor:
    """The (d_out, d_in) weight from its tiles (the inverse of `to_blocks`)."""
    d_out, d_in = shape
    tiles = blocks.reshape(d_out // group_rows, d_in // group_size, group_rows, group_size)
    return tiles.permute(0, 2, 1, 3).reshape(d_out, d_in)


def quantize_int(weight: Tensor, bits: int, group_size: int, group_rows: int = 1,
                 minimum_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a 2-D weight. Returns (codes uint8 in row-major order, scale fp16, min in `minimum_dtype`)
    per block.

    Blocks are ordered row-block major: block (r, c) covers rows r*group_rows.. and columns c*G...
    """
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
    return from_blocks(codes, weight.shape, group_size, group_rows).reshape(-1), scale, minimum


def dequantize_int(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int], group_size: int,
                   group_rows: int = 1, dtype=torch.float32) -> Tensor:
    """The (d_out, d_in) weight s * q + m, computed in fp32."""
    blocks = to_blocks(codes.reshape(shape), group_size, group_rows).float()
    values = torch.addcmul(minimum.float()[:, None], blocks, scale.float()[:, None])
    return from_blocks(values, shape, group_size, group_rows).to(dtype)
