"""LoRA / QLoRA. "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., arXiv:2106.09685).
"QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., arXiv:2305.14314): LoRA on an NF4 base.

    Δ(x) = s · B A x,  s = α / r,  A (r × d_in) Kaiming-uniform,  B (d_out × r) zero  (ΔW = s · B A).

`LoRALinear` is also the B A core of QA-LoRA and Q-BaRA. Only plain LoRA starts from LQ-LoRA / LoftQ factors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qbara.adapters.base import AdaptedLinear, AdapterMethod, device_of
from qbara.errors import QbaraError

__all__ = ["LoRALinear", "lora_shapes"]


class LoRALinear(AdaptedLinear):
    """s · R_out(B A P_in(x)); plain LoRA has both pools 1."""

    method = "lora"

    def __init__(self, base: nn.Module, rank: int, scaling: float, pool_in: int = 1, pool_out: int = 1,
                 dropout: float = 0.0, name: str = "layer"):
        super().__init__(base, pool_in, pool_out, scaling, dropout, name)
        # A rank beyond the core's two sides added up only wastes memory: refused before allocating.
        largest = self.in_features // pool_in + self.out_features // pool_out
        if rank > largest:
            raise QbaraError(f"{name}: {self.method} rank {rank!r} must be a whole number from 1 to {largest} "
                             f"(the sides of its {self.out_features // pool_out}x{self.in_features // pool_in} "
                             f"core added up); lower the rank")
        device = device_of(base)
        self.lora_A = nn.Linear(self.in_features // pool_in, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features // pool_out, bias=False, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (as LoRA's and PEFT's code), B zero: ΔW = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def core(self, pooled: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(pooled))

    def core_matrix(self) -> Tensor:
        return self.lora_B.weight @ self.lora_A.weight

    @torch.no_grad()
    def init_from_factors(self, L1: Tensor, L2: Tensor) -> None:
        """Start from L1 L2 (LQ-LoRA, LoftQ): A = L2/√s, B = L1/√s, so s·B A = L1 L2 at any alpha (PEFT's LoftQ
        omits the √s). Plain LoRA only; two zero factors keep the default start, which can train."""
        if self.pool_in != 1 or self.pool_out != 1:
            raise QbaraError(f"{self.name}: factors initialise plain LoRA only, not {self.method}")
        if L1.shape != self.lora_B.weight.shape or L2.shape != self.lora_A.weight.shape:
            raise QbaraError(f"{self.name}: factors {tuple(L1.shape)} x {tuple(L2.shape)} do not fit rank "
                             f"{self.rank} for a {self.out_features}x{self.in_features} layer")
        if not (L1.any() or L2.any()):  # Q holds W exactly (weights on its grid): no low-rank part. A = B = 0
            self.lora_B.weight.zero_()   # would get no gradient; keep A's default draw (s·B A is 0 all the same)
            return
        root = math.sqrt(self.scaling)
        self.lora_A.weight.copy_(L2 / root)
        self.lora_B.weight.copy_(L1 / root)

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, pool_in={self.pool_in}, pool_out={self.pool_out}"


def lora_shapes(rank: int, layer: dict) -> dict[str, tuple[int, int]]:
    """The saved shapes of a rank-`rank` B A core on a layer record (LoRA and its pooled variants)."""
    d_in, d_out = layer["in_features"] // layer["pool_in"], layer["out_features"] // layer["pool_out"]
    return {"lora_A.weight": (rank, d_in), "lora_B.weight": (d_out, rank)}


class _LoRA(AdapterMethod):
    layer = LoRALinear
    knobs = ("init", "loftq_iters")
    tensors = ("lora_A", "lora_B")
    starts_from_factors = True

    def build(self, base: nn.Module, config, name: str = "layer") -> LoRALinear:
        """LoRA at `config.rank` on `base`."""
        return LoRALinear(base, config.rank, config.scaling, dropout=config.dropout, name=name)

    def shapes(self, config, layer: dict) -> dict[str, tuple[int, int]]:
        return lora_shapes(config.rank, layer)

    def peft_fields(self, layers: dict, alpha: float) -> dict:
        return {"peft_type": "LORA", "lora_alpha": alpha}

    def read_peft(self, data: dict, where) -> dict | None:
        return None if data.get("use_qalora") else {}


LORA = _LoRA()
