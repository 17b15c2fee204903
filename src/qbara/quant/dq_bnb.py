"""bitsandbytes' double quantization of NF4 absmax scales (`QuantConfig(dq_style="bnb")`), bit for bit.

`bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)` stores, per matrix:
one fp32 offset = the mean of the block absmaxes; the absmaxes minus that offset quantized to uint8 codes of
the signed 8-bit *dynamic* map in blocks of 256, each block's absmax kept in fp32. Its 4-bit codes are rounded
against the exact absmax (the scales are compressed afterwards). The dynamic map is written here from its
published definition (Dettmers 2016, bitsandbytes' `create_dynamic_map(signed=True)`); the rounding to it
follows bitsandbytes' CPU kernel (0.50), which is not exactly round-to-nearest (see `dynamic_quantize`).
bitsandbytes' CUDA kernel rounds to the nearest map value by a binary search instead, so scale codes it wrote
can differ from these in places; they dequantize by the same formula (`bnb_double_dequantize`), so adopting a
bitsandbytes layer's buffers (`qbara.nn.bnb`) keeps its weights whichever kernel wrote them.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

DYNAMIC_BLOCK = 256  # scales per nested block (bitsandbytes' `quantize_blockwise(..., blocksize=256)`)
_LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' CPU quantizer


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> Tensor:
    values = [0.0, 1.0]
    for i in range(7):  # exponent 10**(i-6); 2**i fraction steps on each side of zero
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        level = (10 ** (i - 6)) * means
        values += level.tolist() + (-level).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The 256 values of the signed 8-bit dynamic map, ascending, fp32: zero, 1.0, and for exponents
    10**-6 .. 10**0 the midpoints of linspace(0.1, 1, 2**i + 1) (i = 0..6), with both signs."""
    return _dynamic_map_cpu().to(device).clone()


@functools.lru_cache(maxsize=None)
def _dynamic_table(device: torch.device) -> Tensor:
    """`dynamic_map` cached per device (read-only)."""
    return _dynamic_map_cpu().to(device)


@functools.lru_cache(maxsize=None)
def _bin_codes(device: torch.device) -> Tensor:
    """bitsandbytes' CPU lookup table: for each of _LUT_SIZE points v_i = -1 + 2i/(_LUT_SIZE-1) (fp32), the map
    index nearest to v_i (the number of midpoints between adjacent map values that lie below v_i)."""
    table = _dynamic_map_cpu()
    midpoints = 0.5 * (table[:-1] + table[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, right=False).to(torch.uint8).to(device)


def dynamic_quantize(values: Tensor) -> tuple[Tensor, Tensor]:
    """(uint8 codes per value, fp32 absmax per block of DYNAMIC_BLOCK) of fp32 `values` (flat; a last partial
    block is its own block), as bitsandbytes 0.50's CPU `quantize_blockwise` computes them: v / absmax (times
    the fp32 reciprocal) is snapped to a grid of _LUT_SIZE points on [-1, 1] (index = trunc((v + 1) / 2 *
    (_LUT_SIZE - 1) + 0.5)), then to the map value nearest that point. A block whose absmax is 0 gets code 0."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % DYNAMIC_BLOCK)).view(-1, DYNAMIC_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax  # fp32 reciprocal, then a product: bitsandbytes' arithmetic
    normed = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    # (fused or not, the multiply-add gives the same index: 0.5 is a multiple of the product's last place)
    index = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).nan_to_num_(0.0).long().clamp_(0, _LUT_SIZE - 1)
    codes = _bin_codes(flat.device)[index]
    codes = torch.where(absmax[:, None] > 0, codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n].contiguous(), absmax


def dynamic_dequantize(codes: Tensor, absmax: Tensor) -> Tensor:
    """fp32 map[code] * absmax of the code's block (inverse of `dynamic_quantize`)."""
    n = codes.numel()
    values = _dynamic_table(codes.device)[codes.reshape(-1).long()]
    blocks = torch.nn.functional.pad(values, (0, (-n) % DYNAMIC_BLOCK)).view(-1, DYNAMIC_BLOCK)
    return (blocks * absmax.float()[:, None]).reshape(-1)[:n]


def bnb_double_quantize(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(uint8 code per scale, fp32 absmax per 256 scales, fp32 offset (1,)) of fp32 block absmaxes, as
    bitsandbytes' `compress_statistics=True`: offset = mean, then `dynamic_quantize(scales - offset)`."""
    scales = scales.reshape(-1).float()
    offset = scales.mean()
    codes, nested_absmax = dynamic_quantize(scales - offset)
    return codes, nested_absmax, offset.reshape(1)


def bnb_double_dequantize(codes: Tensor, nested_absmax: Tensor, offset: Tensor) -> Tensor:
    """The fp32 scales bitsandbytes' `dequantize_4bit` multiplies the NF4 levels by."""
    return dynamic_dequantize(codes, nested_absmax) + offset.float().reshape(())
