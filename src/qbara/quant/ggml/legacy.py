"""GGML's 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: reference quantizers and dequantizers.

Block layouts (little-endian, element j of a block):
  Q4_0 (18 B) {fp16 d; u8 qs[16]}             w = d * (q - 8),   q = qs[j] & 15 (j < 16) or qs[j-16] >> 4
  Q4_1 (20 B) {fp16 d; fp16 m; u8 qs[16]}     w = d * q + m
  Q5_0 (22 B) {fp16 d; u8 qh[4]; u8 qs[16]}   w = d * (q - 16),  q's fifth bit is bit j of the u32 qh
  Q5_1 (24 B) {fp16 d; fp16 m; u8 qh[4]; u8 qs[16]}   w = d * q + m
  Q8_0 (34 B) {fp16 d; i8 qs[32]}             w = d * q
Quantizers match ggml's `quantize_row_*_ref` (d from the signed absmax or the min-max range) and, with an
importance, `quantize_row_*_impl` (a weighted search per block; Q8_0 ignores the importance)."""
from __future__ import annotations

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.ggml.common import (
    bits_to_bytes,
    bytes_to_bits,
    div,
    first_absmax,
    half_bytes,
    half_from_bytes,
    rdiv,
    roundf,
    sqrt_f32,
)
from qbara.quant.ggml.searches import make_qkx2_quants, make_qx_quants

U8 = torch.uint8


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))


def _pack_nibbles(q: Tensor) -> Tensor:
    return q[:, :16] | (q[:, 16:] << 4)


def _unpack_nibbles(qs: Tensor) -> Tensor:
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _high_bits(q: Tensor) -> Tensor:
    return bits_to_bytes((q >> 4).view(-1, 4, 8), dim=2)


def _codes_5bit(qh: Tensor, qs: Tensor) -> Tensor:
    return _unpack_nibbles(qs) | (bytes_to_bits(qh, dim=2).view(-1, 32) << 4)


def _scale_codes(out: Tensor, codes: Tensor, raw: Tensor, zero: int = 0, affine: bool = False) -> Tensor:
    """out <- (codes - zero) * d (+ m), d and m the fp16 fields at the start of each block."""
    out.copy_(codes.view(torch.int8) - zero if zero else codes)
    out.mul_(half_from_bytes(raw[:, :2])[:, None])
    return out.add_(half_from_bytes(raw[:, 2:4])[:, None]) if affine else out


def _symmetric_codes(x: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Q4_0 / Q5_0: d = signed absmax / -(levels / 2), codes trunc(x / d + levels / 2 + 0.5)."""
    d = div(first_absmax(x, 1), -(levels // 2))
    q = torch.trunc(x * _inverse(d)[:, None] + (levels // 2 + 0.5)).clamp_(0, levels - 1).to(U8)
    return q, d


def _affine_codes(x: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 / Q5_1: m = min, d = (max - min) / (levels - 1), codes trunc((x - m) / d + 0.5)."""
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    d = div(hi - lo, levels - 1)
    q = torch.trunc((x - lo[:, None]) * _inverse(d)[:, None] + 0.5).clamp_(0, levels - 1).to(U8)
    return q, d, lo


def _importance_weights(x: Tensor, qw: Tensor, row_sigma2: Tensor) -> Tensor:
    """Search weights qw * sqrt(sigma2 + x^2), sigma2 the row's mean square; (32, N), one block per column."""
    return (qw * sqrt_f32(row_sigma2[:, None] + x * x)).t().contiguous()


def _weighted_symmetric_codes(x: Tensor, levels: int, qw: Tensor, row_sigma2: Tensor) -> tuple[Tensor, Tensor]:
    d, q = make_qx_quants(x.t().contiguous(), levels // 2, _importance_weights(x, qw, row_sigma2))
    return q.t().to(U8), d


def _weighted_affine_codes(x: Tensor, levels: int, qw: Tensor, row_sigma2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, the_min, q = make_qkx2_quants(x.t().contiguous(), _importance_weights(x, qw, row_sigma2), levels - 1,
                                     -0.9, 0.05, 36, mad=False)
    return q.t().to(U8), d, -the_min


def quantize_q4_0(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 32) fp32 -> (N, 18) Q4_0 bytes; `qw` (N, 32): importance, `row_sigma2` (N,): mean square of each row."""
    q, d = _symmetric_codes(x, 16) if qw is None else _weighted_symmetric_codes(x, 16, qw, row_sigma2)
    return torch.cat([half_bytes(d), _pack_nibbles(q)], dim=1)


def dequantize_q4_0(raw: Tensor, out: Tensor) -> Tensor:
    return _scale_codes(out, _unpack_nibbles(raw[:, 2:]), raw, zero=8)


def quantize_q4_1(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    q, d, m = _affine_codes(x, 16) if qw is None else _weighted_affine_codes(x, 16, qw, row_sigma2)
    return _q4_1_bytes(q, d, m)


def dequantize_q4_1(raw: Tensor, out: Tensor) -> Tensor:
    return _scale_codes(out, _unpack_nibbles(raw[:, 4:]), raw, affine=True)


def quantize_q5_0(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    q, d = _symmetric_codes(x, 32) if qw is None else _weighted_symmetric_codes(x, 32, qw, row_sigma2)
    return torch.cat([half_bytes(d), _high_bits(q), _pack_nibbles(q & 15)], dim=1)


def dequantize_q5_0(raw: Tensor, out: Tensor) -> Tensor:
    return _scale_codes(out, _codes_5bit(raw[:, 2:6], raw[:, 6:]), raw, zero=16)


def quantize_q5_1(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    q, d, m = _affine_codes(x, 32) if qw is None else _weighted_affine_codes(x, 32, qw, row_sigma2)
    return _q5_1_bytes(q, d, m)


def dequantize_q5_1(raw: Tensor, out: Tensor) -> Tensor:
    return _scale_codes(out, _codes_5bit(raw[:, 4:8], raw[:, 8:]), raw, affine=True)


def _q4_1_bytes(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    return torch.cat([half_bytes(d), half_bytes(m), _pack_nibbles(q)], dim=1)


def _q5_1_bytes(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    return torch.cat([half_bytes(d), half_bytes(m), _high_bits(q), _pack_nibbles(q & 15)], dim=1)


def pack_q4_1(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int]) -> Tensor:
    """(d_out, d_in / 32 * 20) Q4_1 bytes of a 1 x 32-block weight scale * code + minimum (INT4 G32, lossless).
    codes: uint8 in [0, 15] per weight, row-major; scale, minimum: fp16, one per block."""
    return _pack_affine(codes, scale, minimum, shape, "Q4_1", 4, _q4_1_bytes)


def pack_q5_1(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int]) -> Tensor:
    """As `pack_q4_1` for INT5 codes in [0, 31]: (d_out, d_in / 32 * 24) Q5_1 bytes."""
    return _pack_affine(codes, scale, minimum, shape, "Q5_1", 5, _q5_1_bytes)


def _pack_affine(codes: Tensor, scale: Tensor, minimum: Tensor, shape: tuple[int, int], kind: str, bits: int,
                 pack) -> Tensor:
    d_out, d_in = shape
    if d_in % 32:
        raise QbaraError(f"{kind} needs the input features ({d_in}) to be a multiple of 32")
    blocks = d_in // 32
    q = codes.detach().to(U8).reshape(d_out * blocks, 32)
    if q.numel() and int(q.max()) >= 1 << bits:
        raise QbaraError(f"{kind} codes must be {bits}-bit (0..{(1 << bits) - 1})")
    if scale.numel() != d_out * blocks or minimum.numel() != d_out * blocks:
        raise QbaraError(f"expected {d_out * blocks} scales and minima for a {d_out}x{d_in} weight in "
                         f"blocks of 32, got {scale.numel()} and {minimum.numel()}")
    return pack(q, scale.reshape(-1), minimum.reshape(-1)).view(d_out, -1)


def quantize_q8_0(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 32) fp32 -> (N, 34) Q8_0 bytes: d = absmax / 127, q = roundf(x / d)."""
    d = div(x.abs().amax(dim=1), 127)
    q = roundf(x * _inverse(d)[:, None]).to(torch.int8)
    return torch.cat([half_bytes(d), q.view(U8)], dim=1)


def dequantize_q8_0(raw: Tensor, out: Tensor) -> Tensor:
    return _scale_codes(out, raw[:, 2:].view(torch.int8), raw)
