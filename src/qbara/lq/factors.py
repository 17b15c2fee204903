"""LQ-LoRA's storage of the low-rank factors: L1, L2 in NF8 (block 64, double quant 8-bit / fp32 / 256 = 8.127
bits per value), and the bits per parameter of Q plus the factors, counted as the paper (arXiv 2311.12023) does."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import quantize

__all__ = ["FACTOR_CONFIG", "quantize_factor", "quantize_factors", "bits_account", "store_factors"]

FACTOR_CONFIG = QuantConfig("nf8", block_size=64, double_quant=True, dq_bits=8, dq_dtype="fp32",
                            dq_block_size=256)  # 8 + 8/64 + 32/(64·256) = 8.127 bits per value


def quantize_factor(factor: Tensor, config: QuantConfig = FACTOR_CONFIG) -> tuple[Tensor, int]:
    """(dequantized factor in its shape and dtype, storage bits) of one factor quantized with `config`. Blocks
    run over the flattened factor, zero-padded; the bits are those of the stored buffers, padding included."""
    if not isinstance(factor, Tensor) or not factor.is_floating_point():
        raise QbaraError(f"quantize_factor needs a floating tensor, got {getattr(factor, 'dtype', type(factor))}")
    if not config.family.nf_levels:
        raise QbaraError(f"factors are stored in an NF format, not {config.label}")
    flat = factor.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        return factor.detach().clone(), 0
    padded = torch.nn.functional.pad(flat, (0, (-n) % config.block_size)).view(-1, config.block_size)
    qt = quantize(padded, config, "low-rank factor")
    values = qt.dequantize(torch.float32).reshape(-1)[:n].view(factor.shape).to(factor.dtype)
    return values, 8 * qt.nbytes


def quantize_factors(factors: Mapping[str, tuple[Tensor, Tensor]], config: QuantConfig = FACTOR_CONFIG
                     ) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """Every (L1, L2) quantized with `config`: (name -> dequantized (L1, L2), total storage bits). Blocks run
    within one rank component (columns of L1, rows of L2), whose magnitude √σ_k they share."""
    out, bits = {}, 0
    for name, (L1, L2) in factors.items():
        q1, b1 = quantize_factor(L1.T, config)  # blocks along d_out within one rank component
        q2, b2 = quantize_factor(L2, config)  # blocks along d_in within one rank component
        out[name] = (q1.T, q2)
        bits += b1 + b2
    return out, bits


@dataclass(frozen=True)
class BitsAccount:
    """Storage of an LQ-LoRA model's decomposed matrices: Q and the low-rank factors, in bits."""

    params: int  # weights of the decomposed matrices (d_out · d_in summed)
    quantized_bits: float  # Σ numel · bits(config) over Q
    factor_bits: float  # Σ bits of the stored factors

    @property
    def quantized_bits_per_param(self) -> float:
        return self.quantized_bits / self.params

    @property
    def factor_bits_per_param(self) -> float:
        return self.factor_bits / self.params

    @property
    def bits_per_param(self) -> float:
        """Q plus factors, per weight of the decomposed matrices."""
        return (self.quantized_bits + self.factor_bits) / self.params

    def to_dict(self) -> dict:
        return {"params": self.params, "quantized_bits_per_param": self.quantized_bits_per_param,
                "factor_bits_per_param": self.factor_bits_per_param, "bits_per_param": self.bits_per_param}


def bits_account(layers, factor_bits: float) -> BitsAccount:
    """The BitsAccount of `layers` (an `LQReport` or name -> (QuantConfig, numel)) with `factor_bits` of factors;
    Q counts by the config formula, as `LQReport.bits_per_param` does."""
    items = getattr(layers, "layers", layers)
    pairs = [(layer.config, layer.numel) if hasattr(layer, "config") else tuple(layer) for layer in items.values()]
    params = sum(int(numel) for _, numel in pairs)
    if params <= 0:
        raise QbaraError("bits_account needs at least one decomposed matrix")
    quantized = sum(config.bits_per_param * int(numel) for config, numel in pairs)
    return BitsAccount(params, float(quantized), float(factor_bits))


def store_factors(report, factors: Mapping[str, tuple[Tensor, Tensor]], config: QuantConfig = FACTOR_CONFIG
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """The factors as stored in `config`; records the bits of Q plus factors in `report.settings`."""
    rounded, bits = quantize_factors(factors, config)
    account = bits_account(report, bits)
    report.settings.update(factor_format=config.label, factor_bits_per_param=account.factor_bits_per_param,
                           total_bits_per_param=account.bits_per_param)
    return rounded
