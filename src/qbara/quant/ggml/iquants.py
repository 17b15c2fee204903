"""GGML's 4-bit i-quants IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256): 4-bit indices into ggml's 16
int8 levels (kvalues_iq4nl) times a scale. Layouts (little-endian):
  IQ4_NL (18 B)  {fp16 d; u8 qs[16]}                                 w = d * level[q]
  IQ4_XS (136 B) {fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}  8 x 32, w = d * (ls - 32) * level[q],
                 ls (6 bits) of sub-block b: nibble b % 2 of scales_l[b // 2], its top two bits at bits 2b
                 of scales_h
Within each 32 weights, element j sits in the low nibble of byte j and element j + 16 in the high one.
Quantizers reproduce ggml's `quantize_iq4_nl` / `quantize_iq4_xs` bit for bit, one block of 32 per column."""
from __future__ import annotations

import torch
from torch import Tensor

from qbara.quant.ggml.common import (
    F32,
    div,
    first_absmax,
    half_bytes,
    half_from_bytes,
    iquant_search_weights,
    nearest_int,
    rdiv,
    seq_sum,
)
from qbara.quant.ggml.legacy import _inverse, _pack_nibbles, _unpack_nibbles
from qbara.quant.ggml.searches import GROUP_MAX_EPS  # a block whose absmax is below it gets scale 0

LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_NTRY = 7  # the scale search tries (itry + LEVELS[0]) / max for itry in -_NTRY .. _NTRY
QK_K = 256


def _levels(device) -> Tensor:
    return torch.tensor(LEVELS, dtype=F32, device=device)


def _best_index(v: Tensor) -> Tensor:
    """ggml's best_index_int8: index of the level nearest v (ties to the upper, in float32; NaN -> 15), found from
    floor(v) through a lookup table since the levels are integers."""
    levels = _levels(v.device)
    floors = torch.arange(-128, 114, dtype=F32, device=v.device)
    upper_of_floor = (floors[:, None] >= levels[None, :]).sum(dim=1).clamp_(1, 15)
    t = v.nan_to_num(nan=200.0, posinf=200.0, neginf=-200.0).floor_().clamp_(-128, 113).long().add_(128)
    upper = upper_of_floor[t]
    return upper - ((v - levels[upper - 1]) < (levels[upper] - v)).long()


def _fit(x: Tensor, w: Tensor, inverse_scale: Tensor) -> tuple[Tensor, Tensor]:
    q = _levels(x.device)[_best_index(inverse_scale * x)]
    wq = w * q
    return seq_sum(wq * x), seq_sum(wq * q)


def _search_scales(cols: Tensor, weight: Tensor) -> Tensor:
    signed_max = first_absmax(cols, dim=0)
    sumqx, sumq2 = _fit(cols, weight, rdiv(1.0, div(signed_max, -LEVELS[0])))
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        sumqx, sumq2 = _fit(cols, weight, rdiv(float(itry + LEVELS[0]), signed_max))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    tiny = cols.abs().amax(dim=0) < torch.tensor(GROUP_MAX_EPS, dtype=F32, device=cols.device)
    return torch.where(tiny, torch.zeros_like(d), d)


def _codes(x: Tensor, scale: Tensor) -> Tensor:
    blocks = x.reshape(-1, 32)
    return _best_index(_inverse(scale)[:, None] * blocks).to(torch.uint8).view(x.shape)


def quantize_iq4_nl(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 32) fp32 -> (N, 18) IQ4_NL bytes; `qw` (N, 32): importance (`row_sigma2` unused)."""
    scale = _search_scales(x.t().contiguous(), iquant_search_weights(x, qw))
    return torch.cat([half_bytes(scale), _pack_nibbles(_codes(x, scale))], dim=1)


def dequantize_iq4_nl(raw: Tensor, out: Tensor) -> Tensor:
    out.copy_(_levels(raw.device)[_unpack_nibbles(raw[:, 2:]).long()])
    return out.mul_(half_from_bytes(raw[:, :2])[:, None])


def _pack_scales(ls: Tensor) -> Tensor:
    """(N, 8) 6-bit scales -> (N, 6) bytes: scales_h (u16, 2 bits each) then scales_l (nibbles)."""
    shifts = torch.arange(0, 16, 2, device=ls.device, dtype=torch.int32)
    high = ((ls >> 4) << shifts).sum(dim=1, dtype=torch.int32)
    low = (ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)
    return torch.cat([torch.stack([high & 255, high >> 8], dim=1), low], dim=1).to(torch.uint8)


def _unpack_scales(raw: Tensor) -> Tensor:
    high = raw[:, 0].int() | (raw[:, 1].int() << 8)
    shifts = torch.arange(0, 16, 2, device=raw.device, dtype=torch.int32)
    low = torch.stack([raw[:, 2:6] & 15, raw[:, 2:6] >> 4], dim=2).reshape(-1, 8).int()
    return low | (((high[:, None] >> shifts) & 3) << 4)


def quantize_iq4_xs(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 136) IQ4_XS bytes (arguments as `quantize_iq4_nl`)."""
    scales = _search_scales(x.reshape(-1, 32).t().contiguous(), iquant_search_weights(x, qw)).view(-1, 8)
    magnitude = scales.abs().nan_to_num(nan=-1.0)  # C's strict `>` scan never picks a NaN
    signed_max = scales.gather(1, magnitude.argmax(dim=1, keepdim=True)).squeeze(1)
    signed_max = torch.where(magnitude.amax(dim=1) > 0, signed_max, torch.zeros_like(signed_max))
    d = div(-signed_max, 32.0)
    ls = nearest_int(_inverse(d)[:, None] * scales).clamp_(-32, 31)
    codes = _codes(x, (d[:, None] * ls.float()).reshape(-1))
    return torch.cat([half_bytes(d), _pack_scales(ls + 32), _pack_nibbles(codes.view(-1, 32)).view(-1, 128)],
                     dim=1)


def dequantize_iq4_xs(raw: Tensor, out: Tensor) -> Tensor:
    step = half_from_bytes(raw[:, :2])[:, None] * (_unpack_scales(raw[:, 2:8]) - 32).float()  # (N, 8)
    levels = _levels(raw.device)[_unpack_nibbles(raw[:, 8:].reshape(-1, 16)).long()].view(-1, 8, 32)
    out.view(-1, 8, 32).copy_(levels).mul_(step[:, :, None])
    return out
