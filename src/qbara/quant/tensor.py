"""`QuantizedTensor`: a packed quantized 2-D weight, and the `quantize` / `dequantize` entry points."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig
from qbara.quant.formats import check_takes_importance


@dataclass
class QuantizedTensor:
    """A quantized (d_out, d_in) weight as packed buffers, laid out by its config's family (`buffer_layout`)."""

    config: QuantConfig
    shape: tuple[int, int]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_param(self) -> float:
        """Bits per weight measured from the actual buffers."""
        return 8 * self.nbytes / self.numel

    def codes(self) -> Tensor:
        """Unpacked codes, one uint8 per weight, row-major."""
        return self.config.family.codes(self)

    def scales(self) -> Tensor:
        """fp32 scale of each block (NF: the double-dequantized absmax)."""
        return self.config.family.scales(self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.config.family.dequantize(self, dtype)

    def dequantize_into(self, out: Tensor) -> Tensor | None:
        """The fp32 weight written into `out` (flat fp32, numel elements, reused by the caller), or None where the
        layout has no in-place path (3- and 5-bit codes, 2-D INT tiles)."""
        return self.config.family.dequantize_into(self, out)

    @property
    def device(self) -> torch.device:
        """Where the packed buffers live (PEFT reads `layer.qweight.device`)."""
        return self.tensors["codes"].device

    def to(self, device) -> "QuantizedTensor":
        return QuantizedTensor(self.config, self.shape, {k: v.to(device) for k, v in self.tensors.items()})


def quantize(weight: Tensor, config: QuantConfig, name: str = "weight",
             importance: Tensor | None = None) -> QuantizedTensor:
    """Quantize a floating 2-D weight with `config` (`name` for errors). `importance` (gguf:* only): a (d_in,)
    importance matrix or (d_out, d_in) per-weight tensor weighting each block's scale search."""
    if importance is not None:
        check_takes_importance([config], f" ({name}: {config.format} rounds each weight to its nearest level)")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise QbaraError(f"{name}: cannot quantize a non-floating weight ({dtype}); pass the float weight "
                         f"(dequantize it first if it is already quantized)")
    config.check_shape(tuple(weight.shape), name)
    extremes = [float(v) for v in torch.aminmax(weight)] if weight.numel() else [0.0]  # one pass, NaN propagates
    if not all(math.isfinite(v) for v in extremes):
        raise QbaraError(f"{name}: weight contains NaN or Inf; fix the checkpoint before quantizing")
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    return QuantizedTensor(config, shape, config.family.quantize(weight, config, name, importance))


def dequantize(qtensor: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return qtensor.dequantize(dtype)
