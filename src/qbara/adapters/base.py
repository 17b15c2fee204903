"""The form every adapter method shares, on a frozen (quantized) linear:

    y = base(x) + s · R_out(core(dropout(P_in(x))))

P_in averages runs of `pool_in` adjacent inputs, R_out repeats each output `pool_out` times, `core` is the
method's trainable map (B A for the LoRA family, one matrix M for QA-HiRA); dropout acts on the pooled input, as in
the QA-LoRA and Q-BaRA reference code. Dense update: ΔW[o, i] = s · core[o // pool_out, i // pool_in] / pool_in.
`AdapterMethod` is the rest qbara knows of a method; `qbara.adapters.methods.METHODS` lists them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qbara.adapters.peft_layout import qbara_only_fields
from qbara.adapters.pooling import expand_tiles, pool_features, repeat_features
from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear, frozen_linear
from qbara.quant.fold import fold_block_constants, fold_problem, fold_rounding
from qbara.quant.tensor import quantize

__all__ = ["AdaptedLinear", "AdapterMethod"]

_MERGE_TARGETS = ("dense", "quantized", "requantized")


def lora_parameter_count(d_out: int, d_in: int, rank: int) -> int:
    """Trainable parameters of plain LoRA at `rank`: r (d_in + d_out), the budget the other methods match."""
    return rank * (d_in + d_out)


def device_of(module: nn.Module) -> torch.device:
    """Where a (quantized) layer's tensors live, so its adapter is created next to them."""
    tensor = next(iter(module.buffers()), None)
    if tensor is None:
        tensor = next(module.parameters())
    return tensor.device


class AdaptedLinear(nn.Module):
    """Common part: the frozen base, pooling factors, scaling, dropout, dense delta, merging and folding."""

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
        self.name = name
        self.in_features, self.out_features = d_in, d_out
        self.pool_in, self.pool_out = pool_in, pool_out
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # --- methods implement these two
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
        return sum(p.numel() for p in self.adapter_parameters().values())

    @property
    def quant_config(self):
        return getattr(self.base, "quant_config", None)

    def adapter_forward(self, x: Tensor) -> Tensor:
        dtype = next(iter(self.adapter_parameters().values())).dtype
        pooled = self.dropout(pool_features(x.to(dtype), self.pool_in))
        return repeat_features(self.core(pooled), self.pool_out) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.adapter_forward(x).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """Dense fp32 ΔW with Δ(x) = ΔW x."""
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

    def check_merge(self, into: str) -> None:
        """Refuse a merge target this layer cannot take (`merge` and `qbara.merge` check every layer first)."""
        if into not in _MERGE_TARGETS:
            raise QbaraError(f"unknown merge target {into!r}: choose one of {', '.join(_MERGE_TARGETS)}")
        problem = self.fold_problem() if into == "quantized" else None
        if problem:
            raise QbaraError(f"{self.name}: {self.method} cannot merge into the quantized model: {problem}; "
                             f"use into='dense' or an adapter that folds (qalora, qahira)")
        if into == "requantized" and self.quant_config is None:
            raise QbaraError(f"{self.name}: merge(into='requantized') needs a quantized base, and this layer's is "
                             f"dense; merge into='dense'")

    @torch.no_grad()
    def fold(self) -> tuple[QuantizedLinear, float, float]:
        """The update folded into the INT base's float minima: (layer, ‖ΔW lost to rounding‖², ‖ΔW‖²)."""
        self.check_merge("quantized")
        before, delta = self.base.qweight, self.delta_weight()
        after = fold_block_constants(before, delta)
        return QuantizedLinear(after, self.base.bias), *fold_rounding(before, after, delta)

    @torch.no_grad()
    def merge(self, into: str = "dense") -> nn.Module:
        """The layer with the adapter merged in. dense: fp32 nn.Linear(dequant(W) + ΔW), exact; quantized: ΔW
        folded into the base's float minima (see `fold`); requantized: dequant(W) + ΔW quantized again (lossy)."""
        self.check_merge(into)
        if into == "quantized":
            return self.fold()[0]
        weight = self.base_weight() + self.delta_weight()
        if into == "dense":
            return frozen_linear(weight, self.base.bias)
        return QuantizedLinear(quantize(weight, self.quant_config, self.name), self.base.bias)


class AdapterMethod:
    """One adapter method: builds its layer and tells the rest of qbara about it. knobs: the AdapterConfig fields
    it reads beyond rank, alpha, dropout, target_modules; tensors: its parameter modules, saved as
    `<layer>.<tensor>.weight`; starts_from_factors: LQ-LoRA / LoftQ factors can start it; presets: named settings
    of its knobs (`AdapterConfig(preset=NAME)`)."""

    layer: type[AdaptedLinear] = AdaptedLinear
    knobs: tuple[str, ...] = ()
    presets: dict[str, dict[str, int]] = {}
    tensors: tuple[str, ...] = ()
    starts_from_factors = False

    @property
    def name(self) -> str:
        return self.layer.method

    def __repr__(self) -> str:
        return f"<adapter method {self.name}>"

    def build(self, base: nn.Module, config, name: str = "layer") -> AdaptedLinear:
        """The adapter layer on `base` that `config` describes; `name` is for error messages."""
        raise NotImplementedError

    def check(self, config) -> None:
        """Refuse what `config` asks of this method that it cannot do (AdapterConfig's last check)."""
        if config.init != "default" and not self.starts_from_factors:
            raise QbaraError(f"init={config.init!r} initialises plain LoRA factors; use method='lora' with it")

    def shapes(self, config, layer: dict) -> dict[str, tuple[int, ...]]:
        """Parameter name -> saved shape for one layer, from its `save_adapter` record and `config`."""
        raise NotImplementedError

    def parameter_count(self, config, layer: dict) -> int:
        """Trainable parameters of one layer (see `shapes`)."""
        return sum(math.prod(shape) for shape in self.shapes(config, layer).values())

    def peft_fields(self, layers: dict, alpha: float) -> dict:
        """The adapter_config.json entries telling PEFT how to read `layers`; by default, that it cannot."""
        return qbara_only_fields(self.name, alpha)

    def read_peft(self, data: dict, where) -> dict | None:
        """This method's AdapterConfig knobs from a PEFT LoRA config `data` (read from `where`), or None."""
        return None

    def peft_alpha_factor(self, in_features: int, pool_in: int) -> int:
        """qbara's alpha over PEFT's lora_alpha for a layer of `in_features` inputs pooled by `pool_in`."""
        return 1

