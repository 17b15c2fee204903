"""QA-LoRA.

QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models (Xu et al., 2023, arXiv:2309.14717).

    Δ(x) = s · B A P_G(x),  A (r × d_in/G),  B (d_out × r),  ΔW[o, i] = s · (B A)[o, i // G] / G,

with G the base's quantization group size: ΔW is constant on every quantization group, so it folds
exactly into an INT base's float minima (`AdaptedLinear.fold`). Pooling averages (as the reference code
does; a sum would make ΔW's Adam steps G times larger). Differences from the released code, kept on purpose:
A starts Kaiming-uniform like LoRA's (bound 1/√(d_in/G)) where QA-LoRA's code uses Xavier-uniform
(bound √(6 / (r + d_in/G))): at r 64 and G 32, 0.236 against 0.270 on 576-wide inputs and 0.144 against
0.231 on 1536-wide ones. The benchmarks ran with this init.
"""
from __future__ import annotations

from torch import nn

from qbara.adapters.base import lora_parameter_count
from qbara.adapters.lora import LoRALinear
from qbara.errors import QbaraError


class QALoRALinear(LoRALinear):
    """LoRA on inputs average-pooled by the base's group size."""

    method = "qalora"

    def __init__(self, base: nn.Module, rank: int, scaling: float, group: int, dropout: float = 0.0,
                 name: str = "layer"):
        super().__init__(base, rank, scaling, group, 1, dropout, name)


def build(base: nn.Module, config, name: str = "layer") -> QALoRALinear:
    """QA-LoRA pooled by `config.pool_in`, by default the base's quantization group size."""
    quant = getattr(base, "quant_config", None)
    group = config.pool_in or (quant.block_size if quant is not None else None)
    if group is None:
        raise QbaraError(f"{name}: qalora pools by the base's group size, but this layer is not quantized; "
                         f"quantize it (prepare with a QuantConfig) or set pool_in")
    return QALoRALinear(base, config.rank, config.scaling, group, config.dropout, name)


def matching_rank(shapes: list[tuple[int, int]], rank: int, group: int) -> int:
    """The QA-LoRA rank whose parameter count over layers of `shapes` (d_out, d_in) is closest to LoRA's at
    `rank`: QA-LoRA's A is G times narrower, so at equal rank it trains fewer parameters."""
    lora = sum(lora_parameter_count(d_out, d_in, rank) for d_out, d_in in shapes)
    return max(1, round(lora / sum(d_in // group + d_out for d_out, d_in in shapes)))
