"""`QuantizedLinear`: a frozen packed weight, dequantized on the fly in forward and backward."""
from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from qbara.quant.config import QuantConfig
from qbara.quant.tensor import QuantizedTensor, quantize

_scratch = threading.local()


def _weight_for_matmul(layer: "QuantizedLinear", dtype: torch.dtype) -> Tensor:
    """Dense weight for one matmul; on CPU fp32 rebuilt into a reused per-thread buffer (use at once, never keep)."""
    qweight = layer.qweight
    if dtype == torch.float32 and layer.codes.device.type == "cpu":
        buffer = getattr(_scratch, "buffer", None)
        if buffer is None or buffer.numel() < qweight.numel:
            buffer = _scratch.buffer = torch.empty(qweight.numel, dtype=torch.float32)
        weight = qweight.dequantize_into(buffer[: qweight.numel])
        if weight is not None:
            return weight
    return layer.dequantize(dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W rebuilt from the packed buffers, again in backward instead of kept alive; no grad for W."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantizedLinear") -> Tensor:
        ctx.layer = layer
        return x @ _weight_for_matmul(layer, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ _weight_for_matmul(ctx.layer, grad_out.dtype), None


class QuantizedLinear(nn.Module):
    """Drop-in for a frozen nn.Linear whose weight is stored quantized as module buffers (`.to`, `state_dict` work)."""

    def __init__(self, qweight: QuantizedTensor, bias: Tensor | None = None):
        super().__init__()
        self.quant_config: QuantConfig = qweight.config
        self.out_features, self.in_features = qweight.shape
        self._buffer_names = tuple(qweight.tensors)
        for name, tensor in qweight.tensors.items():
            self.register_buffer(name, tensor)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, name: str = "linear",
                    importance: Tensor | None = None) -> "QuantizedLinear":
        """Quantize an nn.Linear (its weight is read once, not kept); `importance` as `qbara.quant.quantize`'s."""
        return cls(quantize(linear.weight.data, config, name=name, importance=importance), linear.bias)

    @property
    def qweight(self) -> QuantizedTensor:
        """A view of the packed buffers as a QuantizedTensor (no copy)."""
        return QuantizedTensor(self.quant_config, (self.out_features, self.in_features),
                               {n: getattr(self, n) for n in self._buffer_names})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.qweight.dequantize(dtype)

    def to_linear(self) -> nn.Linear:
        """A frozen fp32 nn.Linear on this layer's device holding the dequantized weight and the bias."""
        return frozen_linear(self.dequantize(torch.float32), self.bias)

    def packed_as_parameters(self) -> None:
        """Hold the packed buffers as frozen parameters (same names, so `state_dict` is unchanged): FSDP shards
        parameters only, and all-gathers them around forward and backward, where they are dequantized as always."""
        for name in self._buffer_names:
            if name in self._buffers:
                tensor = self._buffers.pop(name)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes

    @property
    def bits_per_param(self) -> float:
        return self.qweight.bits_per_param

    def forward(self, x: Tensor) -> Tensor:
        y = _DequantizedMatmul.apply(x, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant={self.quant_config.label}")


def frozen_linear(weight: Tensor, bias: Tensor | None = None) -> nn.Linear:
    """Frozen fp32 nn.Linear holding `weight` (uncopied if fp32) and a copy of `bias`, skipping the random init."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.device, torch.float32, copy=True), requires_grad=False)
    return linear
