"""GGML's K-quants (super-blocks of QK_K = 256 weights): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Block layouts (little-endian; "sub-block" = 16 or 32 weights sharing a quantized scale):
  Q2_K (84 B)  {u8 scales[16]; u8 qs[64]; fp16 d; fp16 dmin}   16 x 16, w = d*(sc & 15)*q - dmin*(sc >> 4)
  Q3_K (110 B) {u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d}   16 x 16, w = d*(sc - 32)*(q - 4), 6-bit sc
  Q4_K (144 B) {fp16 d; fp16 dmin; u8 scales[12]; u8 qs[128]}     8 x 32, w = d*sc*q - dmin*m, 6-bit sc and m
  Q5_K (176 B) {fp16 d; fp16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}   as Q4_K with 5-bit q
  Q6_K (210 B) {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}     16 x 16, w = d*sc*(q - 32)
Code placement is on the pack helpers. Quantizers reproduce ggml's `quantize_row_*_K_ref` and (with an
importance) `quantize_row_*_K_impl` bit for bit, with sub-blocks along dim 1 of an (elements, sub-blocks) array."""
from __future__ import annotations

import torch
from torch import Tensor

from qbara.quant.ggml.common import (
    bits_to_bytes,
    bytes_to_bits,
    div,
    first_absmax,
    half_bytes,
    half_from_bytes,
    nearest_int,
    rdiv,
    seq_sum,
    sqrt_f32,
)
from qbara.quant.ggml.searches import GROUP_MAX_EPS, make_q3_quants, make_qkx2_quants, make_qp_quants, make_qx_quants

QK_K = 256
U8 = torch.uint8


# ------------------------------------------------------------------------------------------ layout

def _columns(x: Tensor, n: int) -> Tensor:
    """(N, 256) -> (n, N * 256 / n): one sub-block of n consecutive weights per column."""
    return x.reshape(-1, n).t().contiguous()


def _rows(cols: Tensor) -> Tensor:
    return cols.t().reshape(-1, QK_K)


def _importance_weights(x: Tensor, qw: Tensor, n: int, sigma_factor: int) -> Tensor:
    """qw * sqrt(sigma2 + x^2), sigma2 = sigma_factor * super-block mean square, as `_columns`."""
    sigma2 = seq_sum(_columns(x, QK_K).square_()) * (sigma_factor / QK_K)  # exact: a power of two
    cols = _columns(x, n)
    return _columns(qw, n).mul_(sqrt_f32(sigma2.repeat_interleave(QK_K // n) + cols * cols))


def _qp_fit(values: Tensor, weights: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """(N, S) sub-block scales (or mins) -> one fp16 step and (N, S) codes in [0, nmax] (`make_qp_quants`)."""
    step, codes = make_qp_quants(values.t().contiguous(), nmax, weights.t().contiguous())
    return step.half(), codes.t().int().contiguous()


# ------------------------------------------------------------------------------------------ requantization

def _requantize(x: Tensor, codes: Tensor, step: Tensor, offset: Tensor | None, lo: int, hi: int) -> Tensor:
    """Codes re-rounded against the stored scales (kept where step is 0); x, codes (N, S, n), step, offset (N, S)."""
    shifted = x + offset[..., None] if offset is not None else x
    fresh = torch.round(shifted / step[..., None]).clamp_(lo, hi) - lo
    return torch.where(step[..., None] != 0, fresh, codes)


def _positive_max(values: Tensor) -> Tensor:
    """Row max if positive, else +0.0 (never -0.0, as C's scan from 0)."""
    top = values.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _c_uint8(values: Tensor) -> Tensor:
    return values & 0xFF


# ------------------------------------------------------------------------------------------ Q4_K / Q5_K

def _pack_scales_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """(N, 8) 6-bit scales and mins -> 12 bytes: 0-3 scales 0-3, 4-7 mins 0-3 (top two bits: high bits of
    scales / mins 4-7), 8-11 low nibbles of scales 4-7 | mins 4-7 << 4."""
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return torch.cat([first, second, third], dim=1).to(U8)


def _unpack_scales_k4(raw: Tensor) -> tuple[Tensor, Tensor]:
    a, b, c = raw[:, :4], raw[:, 4:8], raw[:, 8:12]
    scales = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scales, mins


def _quantize_k4(x: Tensor, nmax: int, rmin: float, nstep: int,
                 qw: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K before bit packing: (header d|dmin|scales (N, 16), codes (N, 8, 32))."""
    cols = _columns(x, 32)
    if qw is None:
        av_x = sqrt_f32(seq_sum(cols * cols) / 32)
        scales, mins, codes = make_qkx2_quants(cols, cols.abs().add_(av_x), nmax, rmin, 0.1, nstep, mad=False)
        scales, mins = scales.view(-1, 8), mins.view(-1, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = torch.where(max_scale > 0, rdiv(63.0, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, rdiv(63.0, max_min), torch.zeros_like(max_min))
        ls = _c_uint8(nearest_int(inv_scale[:, None] * scales)).clamp_(max=63)
        lm = _c_uint8(nearest_int(inv_min[:, None] * mins)).clamp_(max=63)
        d, dmin = div(max_scale, 63).half(), div(max_min, 63).half()
    else:
        weights = _importance_weights(x, qw, 32, 2)
        scales, mins, codes = make_qkx2_quants(cols, weights, nmax, -0.9, 0.05, 36, mad=False)
        summed = seq_sum(weights).view(-1, 8)
        (d, ls), (dmin, lm) = _qp_fit(scales.view(-1, 8), summed, 63), _qp_fit(mins.view(-1, 8), summed, 63)
    codes = _requantize(x.view(-1, 8, 32), _rows(codes).view(-1, 8, 32), d.float()[:, None] * ls,
                        dmin.float()[:, None] * lm, 0, nmax).to(U8)
    return torch.cat([half_bytes(d), half_bytes(dmin), _pack_scales_k4(ls, lm)], dim=1), codes


def _nibble_pairs(codes: Tensor) -> Tensor:
    """(N, 8, 32) codes -> (N, 128): sub-block 2c in the low nibble, 2c + 1 in the high nibble of byte 32c + l."""
    pairs = codes.view(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibble_pairs(qs: Tensor) -> Tensor:
    shifts = torch.tensor([0, 4], dtype=U8, device=qs.device).view(1, 1, 2, 1)
    return ((qs.reshape(-1, 4, 1, 32) >> shifts) & 15).view(-1, 8, 32)


def _apply_k4(raw: Tensor, codes: Tensor, out: Tensor) -> Tensor:
    scales, mins = _unpack_scales_k4(raw[:, 4:16])
    step = half_from_bytes(raw[:, 0:2])[:, None] * scales
    offset = half_from_bytes(raw[:, 2:4])[:, None] * mins
    return _scale_sub_blocks(out, codes, step, offset)


def _scale_sub_blocks(out: Tensor, codes: Tensor, step: Tensor, offset: Tensor | None = None) -> Tensor:
    sub = out.view(codes.shape)
    sub.copy_(codes).mul_(step[..., None])
    return sub.sub_(offset[..., None]) if offset is not None else sub


def quantize_q4_k(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 144) Q4_K bytes; `qw`: importance per weight (`row_sigma2` unused by K-quants)."""
    header, codes = _quantize_k4(x, 15, -1.0, 20, qw)
    return torch.cat([header, _nibble_pairs(codes)], dim=1)


def dequantize_q4_k(raw: Tensor, out: Tensor) -> Tensor:
    return _apply_k4(raw, _unpack_nibble_pairs(raw[:, 16:]), out)


def quantize_q5_k(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 176) Q5_K bytes; fifth bit of sub-block s's code l at bit s of qh[l]."""
    header, codes = _quantize_k4(x, 31, -0.5, 15, qw)
    qh = bits_to_bytes(codes >> 4, dim=1)
    return torch.cat([header, qh, _nibble_pairs(codes & 15)], dim=1)


def dequantize_q5_k(raw: Tensor, out: Tensor) -> Tensor:
    codes = _unpack_nibble_pairs(raw[:, 48:]) | (bytes_to_bits(raw[:, 16:48], dim=1) << 4)
    return _apply_k4(raw, codes, out)


# ------------------------------------------------------------------------------------------ 2-bit planes

def _pack_crumbs(codes: Tensor) -> Tensor:
    """(N, 256) codes < 4 -> (N, 64): element 128n + 32k + l at bits 2k of byte 32n + l."""
    planes = codes.view(-1, 2, 4, 32)
    return (planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_crumbs(qs: Tensor) -> Tensor:
    shifts = torch.arange(0, 8, 2, device=qs.device, dtype=U8).view(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).view(-1, 8, 32)


# ------------------------------------------------------------------------------------------ Q2_K

def quantize_q2_k(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 84) Q2_K bytes (arguments as `quantize_q4_k`)."""
    cols = _columns(x, 16)
    if qw is None:
        scales, mins, codes = make_qkx2_quants(cols, cols.abs(), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.view(-1, 16), mins.view(-1, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        has_scale, has_min = (max_scale > 0)[:, None], (max_min > 0)[:, None]
        ls = torch.where(has_scale, nearest_int(rdiv(15.0, max_scale)[:, None] * scales), 0)
        lm = torch.where(has_min, nearest_int(rdiv(15.0, max_min)[:, None] * mins), 0)
        d = torch.where(has_scale[:, 0], div(max_scale, 15), 0).half()
        dmin = torch.where(has_min[:, 0], div(max_min, 15), 0).half()
    else:
        weights = _importance_weights(x, qw, 16, 1)
        scales, mins, codes = make_qkx2_quants(cols, weights, 3, -0.9, 0.05, 36, mad=False)
        summed = seq_sum(weights).view(-1, 16)
        (d, ls), (dmin, lm) = _qp_fit(scales.view(-1, 16), summed, 15), _qp_fit(mins.view(-1, 16), summed, 15)
    packed = _c_uint8(ls) | _c_uint8(lm << 4)
    codes = _requantize(x.view(-1, 16, 16), _rows(codes).view(-1, 16, 16), d.float()[:, None] * (packed & 15),
                        dmin.float()[:, None] * (packed >> 4), 0, 3).to(U8)
    return torch.cat([packed.to(U8), _pack_crumbs(codes), half_bytes(d), half_bytes(dmin)], dim=1)


def dequantize_q2_k(raw: Tensor, out: Tensor) -> Tensor:
    scales = raw[:, :16]
    step = half_from_bytes(raw[:, 80:82])[:, None] * (scales & 15)
    offset = half_from_bytes(raw[:, 82:84])[:, None] * (scales >> 4)
    return _scale_sub_blocks(out, _unpack_crumbs(raw[:, 16:80]).view(-1, 16, 16), step, offset)


# ------------------------------------------------------------------------------------------ Q3_K

def _pack_scales_q3(ls: Tensor) -> Tensor:
    """(N, 16) 6-bit scales -> 12 bytes: low nibbles of scales j and j + 8 in byte j (j < 8), the high two bits of
    scale j at bits 2*(j // 4) of byte 8 + j % 4."""
    low = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    high = (ls >> 4).view(-1, 4, 4)  # [group j // 4, j % 4]
    high = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return torch.cat([low, high], dim=1).to(U8)


def _unpack_scales_q3(raw: Tensor) -> Tensor:
    low = torch.cat([raw[:, :8] & 15, raw[:, :8] >> 4], dim=1)
    shifts = torch.arange(0, 8, 2, device=raw.device, dtype=U8).view(1, 4, 1)
    high = ((raw[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
    return (low | (high << 4)).int()


def quantize_q3_k(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 110) Q3_K bytes; third bit of element e at bit e // 32 of hmask[e % 32]."""
    if qw is None:
        scales, codes = make_q3_quants(_columns(x, 16), 4)
        scales = scales.view(-1, 16)
        top = first_absmax(scales, 1)
        has = top != 0
        iscale = rdiv(-32.0, torch.where(has, top, torch.ones_like(top)))
        ls = torch.where(has[:, None], nearest_int(iscale[:, None] * scales).clamp_(-32, 31) + 32, 0)
        d = torch.where(has, rdiv(1.0, iscale), 0).half()
    else:
        weights = _importance_weights(x, qw, 16, 2)
        scales, codes = make_qx_quants(_columns(x, 16), 4, weights)
        summed = seq_sum(weights).view(-1, 16)
        step, ls = make_qx_quants(scales.view(-1, 16).t().contiguous(), 32, summed.t().contiguous())
        d, ls = step.half(), ls.t().int().contiguous()
    codes = _requantize(x.view(-1, 16, 16), _rows(codes).view(-1, 16, 16), d.float()[:, None] * (ls - 32),
                        None, -4, 3).to(U8).view(-1, 8, 32)
    high = codes >> 2
    hmask = bits_to_bytes(high, dim=1)
    return torch.cat([hmask, _pack_crumbs(codes & 3), _pack_scales_q3(ls), half_bytes(d)], dim=1)


def dequantize_q3_k(raw: Tensor, out: Tensor) -> Tensor:
    codes = (_unpack_crumbs(raw[:, 32:96]) | (bytes_to_bits(raw[:, :32], dim=1) << 2)).view(torch.int8) - 4
    step = half_from_bytes(raw[:, 108:110])[:, None] * (_unpack_scales_q3(raw[:, 96:108]) - 32)
    return _scale_sub_blocks(out, codes.view(-1, 16, 16), step)


# ------------------------------------------------------------------------------------------ Q6_K

def quantize_q6_k(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 210) Q6_K bytes: element 128n + 32k + l has its low nibble in nibble k // 2 of
    ql[64n + 32(k % 2) + l], its top two bits at bits 2k of qh[32n + l]."""
    scales, codes = make_qx_quants(_columns(x, 16), 32, None if qw is None else _columns(qw, 16))
    scales = scales.view(-1, 16)
    top = first_absmax(scales, 1)
    live = top.abs() >= GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(live, top, torch.ones_like(top)))
    ls = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    d = rdiv(1.0, iscale).half()
    codes = _requantize(x.view(-1, 16, 16), _rows(codes).view(-1, 16, 16), d.float()[:, None] * ls,
                        None, -32, 31).to(U8).view(-1, 2, 4, 32)
    ql = (codes[:, :, :2] & 15) | ((codes[:, :, 2:] & 15) << 4)
    qh = (codes >> 4).view(-1, 2, 4, 32)
    qh = qh[:, :, 0] | (qh[:, :, 1] << 2) | (qh[:, :, 2] << 4) | (qh[:, :, 3] << 6)
    raw = torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), ls.to(torch.int8).view(U8), half_bytes(d)], dim=1)
    return torch.where(live[:, None], raw, torch.zeros_like(raw))  # an all-zero super-block is all zero bytes


def dequantize_q6_k(raw: Tensor, out: Tensor) -> Tensor:
    ql = raw[:, :128].reshape(-1, 2, 1, 2, 32)  # [n, -, k % 2, l]
    low = (ql >> torch.tensor([0, 4], dtype=U8, device=raw.device).view(1, 1, 2, 1, 1)) & 15  # [n, k // 2, k % 2, l]
    shifts = torch.arange(0, 8, 2, device=raw.device, dtype=U8).view(1, 1, 4, 1)
    high = (raw[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3  # [n, k, l]
    codes = (low.view(-1, 2, 4, 32) | (high << 4)).view(torch.int8) - 32
    step = half_from_bytes(raw[:, 208:210])[:, None] * raw[:, 192:208].view(torch.int8)
    return _scale_sub_blocks(out, codes.view(-1, 16, 16), step)
