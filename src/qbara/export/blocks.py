"""GGML block layouts written from qbara's own quantized data (no re-quantization by gguf-py).

Q4_1: per block of 32 consecutive weights of a row, 20 bytes `{fp16 d; fp16 m; uint8 qs[16]}` with
w = d * q + m; element j sits in the low nibble and element j + 16 in the high nibble of qs[j].
That is exactly qbara's INT4 format with group size 32 (fp16 scale, fp16 float minimum), so packing
our codes / scale / minimum into it is lossless.

Q5_1: the same with 5-bit codes, 24 bytes `{fp16 d; fp16 m; uint8 qh[4]; uint8 qs[16]}`: the low 4 bits
as in Q4_1, bit 4 of element j is bit j of the little-endian uint32 qh. Exactly qbara's INT5 G32.

Q8_0: per block of 32, 34 bytes `{fp16 d; int8 qs[32]}` with w = d * q, d = absmax / 127.

All values are little-endian (GGUF's default byte order).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qbara.errors import QbaraError

QK = 32  # weights per block for Q4_1, Q5_1 and Q8_0
Q4_1_BLOCK_BYTES = 20
Q5_1_BLOCK_BYTES = 24
Q8_0_BLOCK_BYTES = 34


def _fp16_bytes(values: Tensor, rows: int, blocks: int) -> np.ndarray:
    """(rows, blocks, 2) uint8: the little-endian bytes of each fp16 value."""
    arr = values.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2", copy=False)
    return arr.reshape(rows, blocks).view(np.uint8).reshape(rows, blocks, 2)


def _block_codes(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int], kind: str,
                 bits: int) -> np.ndarray:
    """The (d_out, d_in / 32, 32) uint8 codes of a 1x32-block INT weight, checked against `kind`'s layout."""
    d_out, d_in = shape
    if d_in % QK:
        raise QbaraError(f"{kind} needs the input features ({d_in}) to be a multiple of {QK}")
    blocks = d_in // QK
    q = codes.detach().to("cpu", torch.uint8).reshape(d_out, blocks, QK).numpy()
    if q.max(initial=0) >= 1 << bits:
        raise QbaraError(f"{kind} codes must be {bits}-bit (0..{(1 << bits) - 1})")
    if scale.numel() != d_out * blocks or minimum.numel() != d_out * blocks:
        raise QbaraError(f"expected {d_out * blocks} scales and minima for a {d_out}x{d_in} weight in "
                         f"blocks of {QK}, got {scale.numel()} and {minimum.numel()}")
    return q


def _affine_blocks(scale: Tensor, minimum: Tensor, shape: tuple[int, int], *fields: np.ndarray) -> np.ndarray:
    """(d_out, row bytes): per block fp16 d, fp16 m, then `fields` (each (d_out, blocks, n) uint8)."""
    d_out, blocks = shape[0], shape[1] // QK
    out = np.concatenate([_fp16_bytes(scale, d_out, blocks), _fp16_bytes(minimum, d_out, blocks), *fields], axis=-1)
    return np.ascontiguousarray(out.reshape(d_out, -1))


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """qs[16] of each block: element j's low 4 bits in the low nibble, element j + 16's in the high one."""
    return ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).astype(np.uint8)


def pack_q4_1(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Q4_1 bytes, shape (d_out, d_in / 32 * 20), of a 1x32-block INT4 weight.

    codes: unpacked uint8 codes in [0, 15], row-major, d_out * d_in of them.
    scale, minimum: one fp16 value per block, blocks in row-major order (d_out, d_in / 32).
    """
    q = _block_codes(codes, scale, minimum, shape, "Q4_1", 4)
    return _affine_blocks(scale, minimum, shape, _low_nibbles(q))


def pack_q5_1(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Q5_1 bytes, shape (d_out, d_in / 32 * 24), of a 1x32-block INT5 weight (codes in [0, 31]; scale and
    minimum as for `pack_q4_1`)."""
    q = _block_codes(codes, scale, minimum, shape, "Q5_1", 5)
    high = np.packbits(q >> 4, axis=-1, bitorder="little")  # bit j of the little-endian uint32 = code j's bit 4
    return _affine_blocks(scale, minimum, shape, high, _low_nibbles(q))


def quantize_q8_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Q8_0 of a 2-D weight: (int8 codes (rows, cols), fp16 d (rows, cols / 32)).

    d = absmax / 127 per block (stored fp16), q = round(x / d) with ties away from zero (as the C
    reference's roundf), computed with the fp32 d. A weight that is already on a Q8_0 grid is
    reproduced exactly.
    """
    rows, cols = weight.shape
    if cols % QK:
        raise QbaraError(f"Q8_0 needs the row length ({cols}) to be a multiple of {QK}")
    x = weight.detach().to("cpu", torch.float32).reshape(rows, cols // QK, QK)
    d = x.abs().amax(dim=-1) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    scaled = x / safe[..., None]
    q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp_(-127, 127)
    q = torch.where(d[..., None] > 0, q, torch.zeros_like(q)).to(torch.int8)
    return q.reshape(rows, cols), d.to(torch.float16)


def dequantize_q8_0(codes: Tensor, d: Tensor) -> Tensor:
    rows, cols = codes.shape
    return (codes.float().reshape(rows, cols // QK, QK) * d.float()[..., None]).reshape(rows, cols)


def pack_q8_0(codes: Tensor, d: Tensor) -> np.ndarray:
    """Q8_0 bytes, shape (rows, cols / 32 * 34), from `quantize_q8_0`'s output."""
    rows, cols = codes.shape
    blocks = cols // QK
    q = codes.detach().to("cpu", torch.int8).reshape(rows, blocks, QK).numpy().view(np.uint8)
    out = np.concatenate([_fp16_bytes(d, rows, blocks), q], axis=-1)
    return np.ascontiguousarray(out.reshape(rows, blocks * Q8_0_BLOCK_BYTES))
