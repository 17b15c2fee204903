"""bitsandbytes' double quantization of NF4 absmax scales (`QuantConfig(dq_style="bnb")`), bit for bit.

Per matrix: one fp32 offset = mean block absmax; absmax - offset as uint8 codes of the signed 8-bit dynamic
map (Dettmers 2016) in blocks of 256, each with an fp32 absmax. Rounding follows bitsandbytes' CPU kernel
(0.50); its CUDA kernel may pick other codes, but both dequantize alike, so adopted buffers keep their weights."""
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
    """The 256 values of the signed 8-bit dynamic map, ascending, fp32: 0, 1, and ± the midpoints of
    linspace(0.1, 1, 2**i + 1) times 10**(i - 6), i = 0..6."""
    return _dynamic_map_cpu().to(device).clone()


@functools.lru_cache(maxsize=None)
def _dynamic_table(device: torch.device) -> Tensor:
    return _dynamic_map_cpu().to(device)


@functools.lru_cache(maxsize=None)
def _bin_codes(device: torch.device) -> Tensor:
    """bitsandbytes' CPU lookup table: for each of _LUT_SIZE points evenly on [-1, 1], the nearest map index."""
    table = _dynamic_map_cpu()
    midpoints = 0.5 * (table[:-1] + table[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, right=False).to(torch.uint8).to(device)


def dynamic_quantize(values: Tensor) -> tuple[Tensor, Tensor]:
    """(uint8 code per value, fp32 absmax per DYNAMIC_BLOCK) of flat fp32 `values`, as bitsandbytes 0.50's CPU
    `quantize_blockwise`: v / absmax snapped to the _LUT_SIZE grid, then to the nearest map value; absmax 0 -> 0."""
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
    """fp32 map[code] * its block's absmax."""
    n = codes.numel()
    values = _dynamic_table(codes.device)[codes.reshape(-1).long()]
    blocks = torch.nn.functional.pad(values, (0, (-n) % DYNAMIC_BLOCK)).view(-1, DYNAMIC_BLOCK)
    return (blocks * absmax.float()[:, None]).reshape(-1)[:n]


def bnb_double_quantize(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(uint8 code per scale, fp32 absmax per 256, fp32 offset (1,)): offset = mean, then `dynamic_quantize`."""
    scales = scales.reshape(-1).float()
    offset = scales.mean()
    codes, nested_absmax = dynamic_quantize(scales - offset)
    return codes, nested_absmax, offset.reshape(1)


def bnb_double_dequantize(codes: Tensor, nested_absmax: Tensor, offset: Tensor) -> Tensor:
    """Inverse of `bnb_double_quantize`: the fp32 block absmaxes."""
    return dynamic_dequantize(codes, nested_absmax) + offset.float().reshape(())
