"""Q-BaRA: "Accurate and Efficient Fine-Tuning of Quantized Large Language Models Through Optimal Balance"
(Shen et al., arXiv:2407.17029).

    Δ(x) = s · R_λ(B A P_λ(x)),  A (λr × d_in/λ),  B (d_out/λ × λr),  ΔW[o, i] = s · (B A)[o // λ, i // λ] / λ.

At rank λ·r it trains r (d_in + d_out) parameters, LoRA's count at rank r. PEFT has no equivalent layer.
"""
from __future__ import annotations

from torch import nn

from qbara.adapters.base import AdapterMethod
from qbara.adapters.lora import LoRALinear, lora_shapes


class QBaRALinear(LoRALinear):
    """LoRA of rank λ·r between λ-pooling of the input and λ-repetition of the output."""

    method = "qbara"

    def __init__(self, base: nn.Module, rank: int, scaling: float, pool: int, dropout: float = 0.0,
                 name: str = "layer"):
        super().__init__(base, pool * rank, scaling, pool, pool, dropout, name)


class _QBaRA(AdapterMethod):
    layer = QBaRALinear
    knobs = ("pool",)
    tensors = ("lora_A", "lora_B")

    def build(self, base: nn.Module, config, name: str = "layer") -> QBaRALinear:
        """Q-BaRA with λ = `config.pool` and LoRA's budget at `config.rank` (its own rank is λ · rank)."""
        return QBaRALinear(base, config.rank, config.scaling, config.pool, config.dropout, name)

    def shapes(self, config, layer: dict) -> dict[str, tuple[int, int]]:
        return lora_shapes(config.pool * config.rank, layer)


QBARA = _QBaRA()
