"""Adapter layers on a frozen (quantized) linear: y = base(x) + s * R_out(core(P_in(x))).

`LoRALinear` covers LoRA/QLoRA (no pooling), QA-LoRA (input pooled by the group size) and Q-BaRA
(input pooled by lambda, rank lambda*r, output repeated lambda times); `HiRALinear` is QA-HiRA's
single matrix. Every layer exposes its exact dense `delta_weight()` and a `merge(into)`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qbara.adapters.pooling import expand_tiles, pool_features, repeat_features
from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.fold import fold_block_constants, fold_problem, fold_rounding


class AdaptedLinear(nn.Module):
    """Common part: the frozen base, pooling factors, scaling, dropout, dense delta and merging."""

    method = "adapter"

    def __init__(self, base: nn.Module, pool_in: int, pool_out: int, scaling: float, dropout: float,
                 name: str = "layer"):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        for what, factor, dim in (("input pooling", pool_in, d_in), ("output repetition", pool_out, d_out)):
            if dim % factor:
                raise QbaraError(f"{name}: {self.method} {what} {factor} does not divide the layer's {dim} "
                                 f"features; choose a factor that divides {dim}")
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.pool_in, self.pool_out = pool_in, pool_out
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # --- subclasses implement these two
    def core(self, pooled: Tensor) -> Tensor:
        """The trainable map on pooled inputs: (..., d_in / pool_in) -> (..., d_out / pool_out)."""
        raise NotImplementedError

    def core_matrix(self) -> Tensor:
        """The core map as one (d_out / pool_out, d_in / pool_in) matrix."""
        raise NotImplementedError

    # --- shared
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters by name (everything but the frozen base)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    @property
    def num_trainable(self) -> int:
        """Trainable parameters of the adapter."""
        return sum(p.numel() for p in self.adapter_parameters().values())

    @property
    def quant_config(self):
        return getattr(self.base, "quant_config", None)

    def adapter_forward(self, x: Tensor) -> Tensor:
        """Delta(x) = s * R_out(core(P_in(x)))."""
        dtype = next(iter(self.adapter_parameters().values())).dtype
        out = repeat_features(self.core(pool_features(x.to(dtype), self.pool_in)), self.pool_out)
        return out * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.adapter_forward(self.dropout(x)).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """Dense fp32 Delta W with Delta(x) = Delta W x: s * core[o // pool_out, i // pool_in] / pool_in."""
        core = self.core_matrix().detach().float()
        return expand_tiles(core, self.pool_out, self.pool_in) * (self.scaling / self.pool_in)

    def fold_problem(self) -> str | None:
        """Why this adapter cannot fold exactly into its quantized base (None if it can)."""
        return fold_problem(self.quant_config, self.pool_out, self.pool_in)

    def base_weight(self) -> Tensor:
        """The frozen base weight, dense fp32."""
        if isinstance(self.base, QuantizedLinear):
            return self.base.dequantize(torch.float32)
        return self.base.weight.detach().float()

    @torch.no_grad()
    def fold(self) -> tuple[QuantizedLinear, float, float]:
        """The update folded into the INT base's float minima: (layer, ‖ΔW the minima's rounding lost‖²,
        ‖ΔW‖²) — see `qbara.quant.fold.fold_rounding`."""
        problem = self.fold_problem()
        if problem:
            raise QbaraError(f"{self.method} cannot merge into the quantized model: {problem}; "
                             f"use merge(into='dense') or an adapter that folds (qalora, qahira)")
        before, delta = self.base.qweight, self.delta_weight()
        after = fold_block_constants(before, delta)
        return QuantizedLinear(after, self.base.bias), *fold_rounding(before, after, delta)

    @torch.no_grad()
    def merge(self, into: str = "dense") -> nn.Module:
        """The layer with the adapter merged in: an nn.Linear (dense) or a QuantizedLinear whose float
        minima absorbed the update exactly (quantized)."""
        bias = self.base.bias
        if into == "dense":
            weight = self.base_weight() + self.delta_weight()
            merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device)
            merged.weight.copy_(weight)
            if bias is not None:
                merged.bias.copy_(bias.float())
            merged.requires_grad_(False)
            return merged
        if into == "quantized":
            return self.fold()[0]
        raise QbaraError(f"unknown merge target {into!r}: choose 'dense' or 'quantized'")


class LoRALinear(AdaptedLinear):
    """s * R_out(B A P_in(x)): LoRA (pools 1), QA-LoRA (pool_in = G) and Q-BaRA (pools lambda, rank lambda*r)."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, pool_in: int = 1, pool_out: int = 1,
                 dropout: float = 0.0, method: str = "lora", name: str = "layer"):
        self.method = method
        super().__init__(base, pool_in, pool_out, scaling, dropout, name)
        # A rank beyond the core's two sides added up only wastes memory: refused before allocating.
        largest = self.in_features // pool_in + self.out_features // pool_out
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= largest:
            raise QbaraError(f"{name}: {method} rank {rank!r} must be a whole number from 1 to {largest} (the "
                             f"sides of its {self.out_features // pool_out}x{self.in_features // pool_in} core "
                             f"added up); lower the rank")
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features // pool_in, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features // pool_out, bias=False, device=device)
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
        """Start from a low-rank product: A = L2/√s, B = L1/√s, so that s·B A = L1 L2 (LQ-LoRA, LoftQ).

        The 1/√s is what makes the model at step 0 equal Q + L1 L2 whatever alpha is (PEFT's LoftQ
        leaves it out, which is only right when s = 1). Plain LoRA (no pooling) only.
        """
        if self.pool_in != 1 or self.pool_out != 1:
            raise QbaraError(f"{self.name}: factors initialise plain LoRA only, not {self.method}")
        if L1.shape != self.lora_B.weight.shape or L2.shape != self.lora_A.weight.shape:
            raise QbaraError(f"{self.name}: factors {tuple(L1.shape)} x {tuple(L2.shape)} do not fit rank "
                             f"{self.rank} for a {self.out_features}x{self.in_features} layer")
        root = math.sqrt(self.scaling)
        self.lora_A.weight.copy_(L2 / root)
        self.lora_B.weight.copy_(L1 / root)

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, pool_in={self.pool_in}, pool_out={self.pool_out}"


class HiRALinear(AdaptedLinear):
    """QA-HiRA: s * R_out(M P_in(x)) with one matrix M (d_out / pool_out, d_in / pool_in), zero at start."""

    method = "qahira"

    def __init__(self, base: nn.Module, scaling: float, pool_in: int, pool_out: int, dropout: float = 0.0,
                 name: str = "layer"):
        super().__init__(base, pool_in, pool_out, scaling, dropout, name)
        self.hira_M = nn.Linear(self.in_features // pool_in, self.out_features // pool_out, bias=False,
                                device=_device_of(base))
        nn.init.zeros_(self.hira_M.weight)

    def core(self, pooled: Tensor) -> Tensor:
        return self.hira_M(pooled)

    def core_matrix(self) -> Tensor:
        return self.hira_M.weight

    def extra_repr(self) -> str:
        return f"method=qahira, pool_in={self.pool_in}, pool_out={self.pool_out}"


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.buffers()), None)
    if tensor is None:
        tensor = next(module.parameters())
    return tensor.device
