"""QA-LoRA (Xu et al., arXiv:2309.14717): "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models".

    Δ(x) = s · B A P_G(x),  A (r × d_in/G),  B (d_out × r),  ΔW[o, i] = s · (B A)[o, i // G] / G,

with G the base's group size: ΔW is constant on every quantization group, so it folds exactly into an INT base's
float minima. Pooling averages, as the reference code does; A starts Kaiming-uniform (that code: Xavier). Saved as
PEFT's QA-LoRA (`use_qalora`), which sum-pools: lora_alpha = alpha / (d_in / G), per layer via `alpha_pattern`.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from qbara.adapters.base import AdapterMethod, lora_parameter_count
from qbara.adapters.lora import LoRALinear, lora_shapes
from qbara.adapters.peft_layout import pattern_keys
from qbara.adapters.pooling import input_pooling
from qbara.errors import QbaraError

__all__ = ["matching_rank"]


class QALoRALinear(LoRALinear):
    """LoRA on inputs average-pooled by the base's group size."""

    method = "qalora"

    def __init__(self, base: nn.Module, rank: int, scaling: float, group: int, dropout: float = 0.0,
                 name: str = "layer"):
        super().__init__(base, rank, scaling, group, 1, dropout, name)


def matching_rank(shapes: list[tuple[int, int]], rank: int, group: int) -> int:
    """The QA-LoRA rank whose parameter count over `shapes` (d_out, d_in) comes closest to LoRA's at `rank`."""
    lora = sum(lora_parameter_count(d_out, d_in, rank) for d_out, d_in in shapes)
    return max(1, round(lora / sum(d_in // group + d_out for d_out, d_in in shapes)))


class _QALoRA(AdapterMethod):
    layer = QALoRALinear
    knobs = ("pool_in",)
    tensors = ("lora_A", "lora_B")

    def build(self, base: nn.Module, config, name: str = "layer") -> QALoRALinear:
        """QA-LoRA pooled by `config.pool_in`, by default the base's quantization group size."""
        group = input_pooling(base, config, name, "qalora pools by the base's group size, but this layer is not "
                                                  "quantized; quantize it (prepare with a QuantConfig) or set pool_in")
        return QALoRALinear(base, config.rank, config.scaling, group, config.dropout, name)

    def shapes(self, config, layer: dict) -> dict[str, tuple[int, int]]:
        return lora_shapes(config.rank, layer)

    def peft_fields(self, layers: dict, alpha: float) -> dict:
        pools = {layer.pool_in for layer in layers.values()}
        if len(pools) != 1:
            return super().peft_fields(layers, alpha)
        group = pools.pop()
        groups = {name: self.peft_alpha_factor(layer.in_features, group) for name, layer in layers.items()}
        default = Counter(groups.values()).most_common(1)[0][0]
        pattern = {key: alpha / n for key, n in pattern_keys(groups, default).items()}
        return {"peft_type": "LORA", "lora_alpha": alpha / default, "alpha_pattern": pattern,
                "use_qalora": True, "qalora_group_size": group}

    def read_peft(self, data: dict, where) -> dict | None:
        if not data.get("use_qalora"):
            return None
        group = data.get("qalora_group_size", 16)  # PEFT's default
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
            raise QbaraError(f"{where}: qalora_group_size={group!r} must be a positive integer")
        return {"pool_in": group}

    def peft_alpha_factor(self, in_features: int, pool_in: int) -> int:
        """PEFT sum-pools: n = in_features / G groups."""
        return in_features // pool_in


QALORA = _QALoRA()
