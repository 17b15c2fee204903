"""NormalFloat NF-k block-wise absmax quantization (QLoRA, LQ-LoRA)."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

NF_OFFSET = 0.9677083  # 1 - (1/30 + 1/32) / 2, rounded as in QLoRA's published NF4 table


@functools.lru_cache(maxsize=None)
def _nf_levels_np(bits: int) -> np.ndarray:
    # Probabilities are taken on a float32 grid (torch.linspace), as in QLoRA's published NF4 table;
    # the negative side is the mirror image of the quantiles at linspace(offset, 1/2, 2**(k-1)).
    from scipy.stats import norm  # imported on first use: scipy.stats alone takes seconds to import

    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1).numpy())[:-1]
    negative = -norm.ppf(torch.linspace(NF_OFFSET, 0.5, half).numpy())[:-1]
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return (levels / levels.max()).astype(np.float32)


def nf_levels(bits: int, device: torch.device | str | None = None) -> Tensor:
    """The 2**bits NF levels in [-1, 1], ascending (NF4 equals bitsandbytes' nf4 table)."""
    return torch.from_numpy(_nf_levels_np(bits).copy()).to(device)


@functools.lru_cache(maxsize=None)
def nf_level_table(bits: int, device: torch.device) -> Tensor:
    """`nf_levels(bits)` cached per device (read-only: shared by every caller)."""
    return nf_levels(bits, device)


def nf_midpoints(bits: int, device: torch.device | str | None = None) -> Tensor:
    """The 2**bits - 1 rounding boundaries between adjacent NF levels."""
    levels = nf_levels(bits, device)
    return (levels[1:] + levels[:-1]) / 2


def block_absmax(weight: Tensor, block_size: int) -> Tensor:
    """fp32 absmax of every block of `block_size` elements of the flattened (row-major) weight."""
    return weight.detach().reshape(-1, block_size).float().abs().amax(dim=1)


def scale_blocks(weight: Tensor, block_size: int, scales: Tensor) -> Tensor:
    """weight / scale per block, clamped to [-1, 1], as (n_blocks, block_size) fp32 (0 where a scale is 0).

    Multiplies by the reciprocal as bitsandbytes does, so the codes round identically. With scales below
    a block's absmax (double-quantized ones), values past ±1 clamp to the extreme level, which is still
    the nearest level to weight / scale."""
    flat = weight.detach().reshape(-1, block_size).float()
    scales = scales.float()
    inv = torch.where(scales > 0, 1.0 / scales.clamp(min=1e-38), torch.zeros_like(scales))
    return (flat * inv[:, None]).clamp_(-1.0, 1.0)


def round_nf(weight: Tensor, bits: int, block_size: int, scales: Tensor) -> Tensor:
    """uint8 codes (weight's numel) of the nearest NF-`bits` level to weight / scale, one scale per block:
    the best codes for dequantization with exactly these scales (e.g. double-dequantized ones)."""
    scaled = scale_blocks(weight, block_size, scales)
    return torch.bucketize(scaled, nf_midpoints(bits, scaled.device), out_int32=True).to(torch.uint8).reshape(-1)


def quantize_nf(weight: Tensor, bits: int, block_size: int) -> tuple[Tensor, Tensor]:
    """Quantize `weight` (flattened row-major) in blocks of `block_size` by absmax to NF-`bits`.

    Returns (codes uint8 of weight's numel, absmax fp32 per block). Rounds to the nearest level.
    """
    absmax = block_absmax(weight, block_size)
    return round_nf(weight, bits, block_size, absmax), absmax


def dequantize_nf(codes: Tensor, absmax: Tensor, bits: int, block_size: int, dtype=torch.float32) -> Tensor:
    """Flat dequantized values: level[code] * absmax of the code's block."""
    levels = nf_level_table(bits, codes.device)
    values = levels[codes.long()].view(-1, block_size) * absmax.float()[:, None]
    return values.reshape(-1).to(dtype)
