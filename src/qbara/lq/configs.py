"""LQ-LoRA's candidate quantization configurations (the paper's ILP search space, arXiv 2311.12023) and
Pareto pruning.

432 NF configurations: b ∈ {2,3,4,8} code bits, B0 ∈ {16,32,64} block size, and double quantization
of the absmax scales with b0 ∈ {2,3,4,8} bits in groups of B1 ∈ {16,64,256} scales whose maxima are
stored in b1 ∈ {bf16, fp16, fp32}: bits(c) = b + b0/B0 + b1/(B0·B1), from 2.03 to 8.63 bits/param.
`gguf_configs`: llama.cpp's GGML block formats (q2_k ... q8_0, iq4_nl, iq4_xs), the candidates for a GGUF file.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig
from qbara.quant.ggml import GGML_FORMATS

__all__ = ["DQ_DTYPES", "candidate_configs", "config_bits", "pareto_front", "qlora_config", "gguf_configs"]

_CODE_BITS = (2, 3, 4, 8)  # b
_DQ_BITS = (2, 3, 4, 8)  # b0
DQ_DTYPES = ("bf16", "fp16", "fp32")  # b1
_BLOCK_SIZES = (16, 32, 64)  # B0
_DQ_BLOCK_SIZES = (16, 64, 256)  # B1


def candidate_configs(code_bits: Sequence[int] = _CODE_BITS, block_sizes: Sequence[int] = _BLOCK_SIZES,
                      dq_bits: Sequence[int] = _DQ_BITS, dq_dtypes: Sequence[str] = DQ_DTYPES,
                      dq_block_sizes: Sequence[int] = _DQ_BLOCK_SIZES) -> list[QuantConfig]:
    """The LQ-LoRA candidate set (432 configs with the defaults), in a fixed order: b, B0, b0, b1, B1.

    Configs sharing (b, B0) are contiguous: they differ only in how the absmax scales are stored.
    """
    return [QuantConfig(f"nf{b}", block_size=B0, double_quant=True, dq_bits=b0, dq_dtype=b1, dq_block_size=B1)
            for b, B0, b0, b1, B1 in itertools.product(code_bits, block_sizes, dq_bits, dq_dtypes,
                                                        dq_block_sizes)]


def gguf_configs(names: Sequence[str] | None = None) -> list[QuantConfig]:
    """llama.cpp's GGML block formats as candidates (default: all twelve), by bits/param: q2_k 2.625, q3_k 3.4375,
    iq4_xs 4.25, iq4_nl 4.5, q4_0 4.5, q4_k 4.5, q4_1 5, q5_0 5.5, q5_k 5.5, q5_1 6, q6_k 6.5625, q8_0 8.5.

    All twelve are kept: the K-quants (blocks of 256) fit only rows whose length 256 divides, and which of two
    formats of equal bits errs less differs per matrix; `lq.tables.matrix_costs` gives +inf where a shape cannot
    take a format and the ILP drops dominated ones. names: a subset, e.g. ("q4_k", "q6_k"), with or without "gguf:".
    """
    chosen = list(GGML_FORMATS) if names is None else [str(n).lower().removeprefix("gguf:") for n in names]
    unknown = [n for n in chosen if n not in GGML_FORMATS]
    if unknown or not chosen:
        raise QbaraError(f"unknown GGML formats {unknown or '(none given)'}: choose from {', '.join(GGML_FORMATS)}")
    configs = [QuantConfig(f"gguf:{n}") for n in dict.fromkeys(chosen)]
    return sorted(configs, key=lambda c: (c.bits_per_param, c.format))


def qlora_config(bits: int = 4) -> QuantConfig:
    """QLoRA's NF-k with double quant (b0=8, fp32, B0=64, B1=256): 4.127 bits for NF4, 3.127 for NF3."""
    return QuantConfig(f"nf{bits}", block_size=64, double_quant=True, dq_bits=8, dq_dtype="fp32",
                       dq_block_size=256)


def config_bits(configs: Sequence[QuantConfig]) -> list[float]:
    """Bits per parameter of every config (formula, without the per-matrix offset)."""
    return [c.bits_per_param for c in configs]


def pareto_front(bits: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the configs not dominated by another (fewer or equal bits and lower error), by bits.

    A config is dropped when another has bits <= and error <= with at least one of them strictly
    smaller, and of exact (bits, error) duplicates only the first is kept. Non-finite errors (a config
    that cannot hold the matrix) are dropped. Along the result, bits increase and errors strictly
    decrease. Pruning these never changes the optimum of the allocation problem.
    """
    if len(bits) != len(errors):
        raise ValueError(f"bits and errors differ in length ({len(bits)} vs {len(errors)})")
    order = sorted((i for i in range(len(bits)) if math.isfinite(float(errors[i]))),
                   key=lambda i: (float(bits[i]), float(errors[i]), i))
    kept: list[int] = []
    best = math.inf
    for i in order:
        e = float(errors[i])
        if e < best:  # sorted by bits then error: only a strictly lower error survives
            kept.append(i)
            best = e
    return kept
