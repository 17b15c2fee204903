"""NormalFloat NF-k block-wise absmax quantization, from "QLoRA: Efficient Finetuning of Quantized LLMs"
(arXiv 2305.14314); NF2/NF3/NF8 as LQ-LoRA (arXiv 2311.12023) uses them."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from qbara.quant.packing import check_out, unpack_lookup

_NF_OFFSET = 0.9677083  # 1 - (1/30 + 1/32) / 2, rounded as in QLoRA's published NF4 table


@functools.lru_cache(maxsize=None)
def _nf_levels_np(bits: int) -> np.ndarray:
    # Probabilities are taken on a float32 grid (torch.linspace), as in QLoRA's published NF4 table;
    # the negative side is the mirror image of the quantiles at linspace(offset, 1/2, 2**(k-1)).
    from scipy.stats import norm  # imported on first use: scipy.stats alone takes seconds to import

    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(_NF_OFFSET, 0.5, half + 1).numpy())[:-1]
    negative = -norm.ppf(torch.linspace(_NF_OFFSET, 0.5, half).numpy())[:-1]
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return (levels / levels.max()).astype(np.float32)


def nf_levels(bits: int, device: torch.device | str | None = None) -> Tensor:
    """The 2**bits NF levels in [-1, 1], ascending (NF4 equals bitsandbytes' nf4 table)."""
    return torch.from_numpy(_nf_levels_np(bits).copy()).to(device)


@functools.lru_cache(maxsize=None)
def _nf_level_table(bits: int, device: torch.device) -> Tensor:
    return nf_levels(bits, device)


def nf_midpoints(bits: int, device: torch.device | str | None = None) -> Tensor:
    levels = nf_levels(bits, device)
    return (levels[1:] + levels[:-1]) / 2


def block_absmax(weight: Tensor, block_size: int) -> Tensor:
    """fp32 absmax of every block of `block_size` elements of the flattened (row-major) weight."""
    return weight.detach().reshape(-1, block_size).float().abs().amax(dim=1)


def scale_blocks(weight: Tensor, block_size: int, scales: Tensor) -> Tensor:
    """weight / scale per block, clamped to [-1, 1], as (n_blocks, block_size) fp32 (0 where a scale is 0).
    Multiplies by the reciprocal as bitsandbytes does, so codes round identically."""
    flat = weight.detach().reshape(-1, block_size).float()
    scales = scales.float()
    inv = torch.where(scales > 0, 1.0 / scales.clamp(min=1e-38), torch.zeros_like(scales))
    return (flat * inv[:, None]).clamp_(-1.0, 1.0)


def round_nf(weight: Tensor, bits: int, block_size: int, scales: Tensor) -> Tensor:
    """uint8 codes of the nearest NF level to weight / scale: the best codes for exactly these scales."""
    return nf_codes(scale_blocks(weight, block_size, scales), bits).to(torch.uint8).reshape(-1)


def quantize_nf(weight: Tensor, bits: int, block_size: int) -> tuple[Tensor, Tensor]:
    """(codes uint8 of weight's numel, fp32 absmax per block) of the flattened weight, nearest level."""
    absmax = block_absmax(weight, block_size)
    return round_nf(weight, bits, block_size, absmax), absmax


def dequantize_nf(codes: Tensor, absmax: Tensor, bits: int, block_size: int, dtype=torch.float32, *,
                  packed: bool = False, out: Tensor | None = None) -> Tensor:
    """Flat level[code] * its block's absmax, in fp32. `packed`: `codes` is the `pack_bits` buffer (read without
    unpacking). `out`: a flat fp32 buffer to write into (`dtype` must be fp32), returned."""
    check_out(out, dtype)
    levels = _nf_level_table(bits, codes.device)
    if packed:
        values = unpack_lookup(codes, bits, absmax.numel() * block_size, levels, out=out)
    else:
        values = levels[codes.reshape(-1).long()]
    values.view(-1, block_size).mul_(absmax.float()[:, None])  # values is this call's own (or `out`)
    if out is not None and values.data_ptr() != out.data_ptr():  # a layout unpack_lookup cannot write into `out`
        values = out.copy_(values)
    return values.to(dtype)




# --- Nearest-level rounding, exactly `torch.bucketize` against the NF midpoints but faster: a scaled value maps to one
# of 2**16 uniform bins whose code is tabulated when no (margin-widened) midpoint falls inside; only values in bins
# straddling a midpoint go through bucketize. LQ-LoRA's error tables call this very often.

_BINS = 1 << 16
_MARGIN = 2.0**-18  # far above the rounding error of (x + 1) * BINS/2 for x in [-1, 1]


def _tables(bits: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _device_tables(bits, str(device))


@functools.lru_cache(maxsize=None)
def _device_tables(bits: int, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if device != "cpu":
        return tuple(t.to(device) for t in _device_tables(bits, "cpu"))
    mids = nf_midpoints(bits)
    levels = nf_levels(bits)
    edges = torch.linspace(-1.0, 1.0, _BINS + 1, dtype=torch.float64).float()
    lo = torch.bucketize(edges[:-1] - _MARGIN, mids)
    hi = torch.bucketize(edges[1:] + _MARGIN, mids)
    value = levels[lo].clone()
    value[lo != hi] = float("nan")  # bins straddling a midpoint: resolved exactly per element
    code = lo.clone()
    code[lo != hi] = -1
    return value, code, mids, levels


def _bin_index(scaled: Tensor) -> Tensor:
    # (x + 1) * BINS/2 as int32 bin numbers, up to a rounding far below the margin of the tables.
    half = float(_BINS // 2)
    return torch.addcmul(torch.full((), half), scaled, torch.full((), half)).to(torch.int32).clamp_(0, _BINS - 1)


def nf_codes(scaled: Tensor, bits: int) -> Tensor:
    """`torch.bucketize(scaled, nf_midpoints(bits))` for `scaled` in [-1, 1] (any shape), int64."""
    _, code_table, mids, _ = _tables(bits, scaled.device)
    codes = code_table.index_select(0, _bin_index(scaled).reshape(-1)).view(scaled.shape)
    pos = (codes < 0).nonzero(as_tuple=True)
    if pos[0].numel():
        codes[pos] = torch.bucketize(scaled[pos], mids)
    return codes


def quantize_nf_values(weight: Tensor, bits: int, block_size: int,
                       scales: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`round_nf` + `dequantize_nf` without codes, bit-identical: (v (n_blocks, block_size) NF level values,
    s fp32 per block (`scales` or absmax), deq = v * s in weight's shape)."""
    s = block_absmax(weight, block_size) if scales is None else scales.float()
    scaled = scale_blocks(weight, block_size, s)  # the same scaling as qbara.quant.nf.round_nf
    v = nf_values(scaled, bits)
    deq = (v * s[:, None]).view(weight.shape)
    return v, s, deq


def nf_values(scaled: Tensor, bits: int) -> Tensor:
    """`nf_levels(bits)[torch.bucketize(scaled, nf_midpoints(bits))]` for `scaled` in [-1, 1] (any shape)."""
    value_table, _, mids, levels = _tables(bits, scaled.device)
    v = value_table.index_select(0, _bin_index(scaled).reshape(-1)).view(scaled.shape)
    pos = torch.isnan(v).nonzero(as_tuple=True)
    if pos[0].numel():
        v[pos] = levels[torch.bucketize(scaled[pos], mids)]
    return v


def keep_ratios(scaled: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(lo, hi) per element of `scaled` in [-1, 1]: its nearest NF level is unchanged by scaling with rho in
    (lo, hi] (±inf where unbounded; empty for -0.0)."""
    mids = nf_midpoints(bits, scaled.device)
    inf = torch.full((1,), float("inf"), device=scaled.device)
    edges = torch.cat([-inf, mids, inf])
    codes = nf_codes(scaled, bits)
    below, above = edges[codes], edges[codes + 1]  # below < scaled <= above
    # scaled = 0 (the zero level) gives -inf / +inf: never moves.
    positive = scaled >= 0
    return torch.where(positive, below, above) / scaled, torch.where(positive, above, below) / scaled
