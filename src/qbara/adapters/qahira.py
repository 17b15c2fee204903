"""QA-HiRA: "Accurate and Efficient Fine-Tuning of Quantized Large Language Models Through Optimal Balance"
(Shen et al., arXiv:2407.17029).

    Δ(x) = s · R_λout(M P_λin(x)),  M (d_out/λout × d_in/λin),  ΔW[o, i] = s · M[o // λout, i // λin] / λin,

M starts at zero. With λin a multiple of the base's group size (default λin = G) and λout of its block rows,
ΔW is constant on every quantization block and folds exactly into the float minima. PEFT has no equivalent layer.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from qbara.adapters.base import AdaptedLinear, AdapterMethod, device_of, lora_parameter_count
from qbara.adapters.pooling import input_pooling
from qbara.errors import QbaraError


class HiRALinear(AdaptedLinear):
    """QA-HiRA: s · R_out(M P_in(x)) with one matrix M (d_out / pool_out, d_in / pool_in), zero at start."""

    method = "qahira"

    def __init__(self, base: nn.Module, scaling: float, pool_in: int, pool_out: int, dropout: float = 0.0,
                 name: str = "layer"):
        super().__init__(base, pool_in, pool_out, scaling, dropout, name)
        self.hira_M = nn.Linear(self.in_features // pool_in, self.out_features // pool_out, bias=False,
                                device=device_of(base))
        nn.init.zeros_(self.hira_M.weight)

    def core(self, pooled: Tensor) -> Tensor:
        return self.hira_M(pooled)

    def core_matrix(self) -> Tensor:
        return self.hira_M.weight

    def extra_repr(self) -> str:
        return f"method=qahira, pool_in={self.pool_in}, pool_out={self.pool_out}"


def auto_pool_out(d_out: int, d_in: int, pool_in: int, rank: int, multiple_of: int = 1) -> int:
    """The divisor of d_out (a multiple of `multiple_of`) whose parameter count comes closest to LoRA's at `rank`."""
    target = lora_parameter_count(d_out, d_in, rank)
    candidates = [p for p in range(multiple_of, d_out + 1, multiple_of) if d_out % p == 0]
    if not candidates:
        raise QbaraError(f"no output repetition divides {d_out} and is a multiple of {multiple_of}")
    return min(candidates, key=lambda p: (abs((d_out // p) * (d_in // pool_in) - target), -p))


class _QAHiRA(AdapterMethod):
    layer = HiRALinear
    knobs = ("pool_in", "pool_out")
    # "authors": the paper's tile, λin = 4, λout = 8 on every layer, for an INT4 base quantized in 4-column x 8-row
    # tiles (QuantConfig("int4", block_size=4, block_rows=8)). The default's per-layer λout differs where the
    # shapes are not square: 16 on LLaMA-7B's MLP layers (11008 x 4096 at rank 64), 8 on its attention.
    presets = {"authors": {"pool_in": 4, "pool_out": 8}}
    tensors = ("hira_M",)

    def build(self, base: nn.Module, config, name: str = "layer") -> HiRALinear:
        """QA-HiRA; pool_in defaults to the base's group size, pool_out to LoRA's budget at `config.rank`."""
        quant = getattr(base, "quant_config", None)
        pool_in = input_pooling(base, config, name, "qahira's default pool_in is the base's group size, but this "
                                                    "layer is not quantized; quantize it or set pool_in")
        if base.in_features % pool_in:
            raise QbaraError(f"{name}: qahira input pooling {pool_in} does not divide the layer's "
                             f"{base.in_features} features; choose a pool_in that divides {base.in_features}")
        rows = quant.family.block_rows(quant) if quant is not None else 1
        pool_out = config.pool_out or auto_pool_out(base.out_features, base.in_features, pool_in, config.rank, rows)
        return HiRALinear(base, config.scaling, pool_in, pool_out, config.dropout, name)

    def shapes(self, config, layer: dict) -> dict[str, tuple[int, int]]:
        return {"hira_M.weight": (layer["out_features"] // layer["pool_out"],
                                  layer["in_features"] // layer["pool_in"])}


QAHIRA = _QAHiRA()
