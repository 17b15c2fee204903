"""LQ-LoRA's candidate quantization configs (the ILP's search space, arXiv 2311.12023) and Pareto pruning.
432 NF configs: b ∈ {2,3,4,8} code bits, block B0 ∈ {16,32,64}, absmax scales double-quantized to b0 ∈ {2,3,4,8}
bits in groups of B1 ∈ {16,64,256} with maxima in b1 ∈ {bf16, fp16, fp32}: bits = b + b0/B0 + b1/(B0·B1).
`gguf_configs`: llama.cpp's GGML block formats, the candidates for a GGUF file."""
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
    """The LQ-LoRA candidates (432 with the defaults), ordered by b, B0, b0, b1, B1."""
    return [QuantConfig(f"nf{b}", block_size=B0, double_quant=True, dq_bits=b0, dq_dtype=b1, dq_block_size=B1)
            for b, B0, b0, b1, B1 in itertools.product(code_bits, block_sizes, dq_bits, dq_dtypes,
                                                        dq_block_sizes)]


def gguf_configs(names: Sequence[str] | None = None) -> list[QuantConfig]:
    """llama.cpp's GGML block formats (default all of GGML_FORMATS, `names` a subset, "gguf:" optional), by bits/param.
    All are kept: K-quants fit only rows that 256 divides, and which of two equal-bit formats errs less differs per
    matrix; the ILP drops dominated ones."""
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
    return [c.bits_per_param for c in configs]


def pareto_front(bits: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the configs no other dominates (bits <= and error <=, one strictly), ordered by bits; of exact
    duplicates the first is kept, non-finite errors are dropped. Pruning them never changes the ILP's optimum."""
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
