"""GGML (llama.cpp / GGUF) block formats as quantization primitives: `quantize_ggml` gives the exact block bytes
llama-quantize writes (with an importance matrix when given), `dequantize_ggml` the fp32 weight they hold."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.ggml import iq3, iquants, kquants, legacy
from qbara.quant.ggml.common import FP16_MAX, div, seq_sum
from qbara.quant.ggml.legacy import pack_q4_1, pack_q5_1

# Weights quantized at once: the search's float32 work arrays stay near 256 K elements (1 MB each, cache-sized).
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class GGMLFormat:
    """One GGML block format: `block_size` weights of a row in `type_size` bytes."""

    name: str
    type_id: int  # GGMLQuantizationType value
    block_size: int
    type_size: int
    # (N, block_size) fp32 [, importance (N, block_size), row mean square (N,)] -> (N, type_size) uint8
    quantize_blocks: Callable[..., Tensor]
    dequantize_blocks: Callable[[Tensor, Tensor], Tensor]  # (N, type_size) uint8, out (N, block_size) fp32

    @property
    def bits_per_param(self) -> float:
        return 8 * self.type_size / self.block_size

    @property
    def bits(self) -> int:
        """Bits of each weight's code (q4_k -> 4)."""
        return int(self.name.lstrip("iq")[0])

    @property
    def ggml_type(self):
        return GGMLQuantizationType(self.type_id)

    def row_bytes(self, d_in: int) -> int:
        return d_in // self.block_size * self.type_size


def _format(name: str, type_id: int, block_size: int, type_size: int, module) -> GGMLFormat:
    return GGMLFormat(name, type_id, block_size, type_size, getattr(module, f"quantize_{name}"),
                      getattr(module, f"dequantize_{name}"))


GGML_FORMATS: dict[str, GGMLFormat] = {f.name: f for f in (
    _format("q4_0", 2, 32, 18, legacy),
    _format("q4_1", 3, 32, 20, legacy),
    _format("q5_0", 6, 32, 22, legacy),
    _format("q5_1", 7, 32, 24, legacy),
    _format("q8_0", 8, 32, 34, legacy),
    _format("q2_k", 10, 256, 84, kquants),
    _format("q3_k", 11, 256, 110, kquants),
    _format("q4_k", 12, 256, 144, kquants),
    _format("q5_k", 13, 256, 176, kquants),
    _format("q6_k", 14, 256, 210, kquants),
    _format("iq3_xxs", 18, 256, 98, iq3),
    _format("iq3_s", 21, 256, 110, iq3),
    _format("iq4_nl", 20, 32, 18, iquants),
    _format("iq4_xs", 23, 256, 136, iquants),
)}


def _ggml_format(name: str) -> GGMLFormat:
    fmt = GGML_FORMATS.get(name.lower()) if isinstance(name, str) else None
    if fmt is None:
        raise QbaraError(f"unknown GGML block format {name!r}: choose one of {', '.join(GGML_FORMATS)}")
    return fmt


def check_ggml_shape(shape: tuple[int, ...], fmt: GGMLFormat, what: str = "weight", prefix: str = "") -> None:
    """Raise a QbaraError naming `what` unless a `shape` weight fits `fmt` (`prefix`: e.g. "gguf:" in hints)."""
    if len(shape) != 2:
        raise QbaraError(f"{what}: only 2-D weights can be quantized, got shape {tuple(shape)}")
    d_in = shape[1]
    if d_in % fmt.block_size:
        others = [prefix + n for n, f in GGML_FORMATS.items() if d_in % f.block_size == 0]
        hint = f"use one of {', '.join(others)}" if others else "no GGML block format fits it"
        raise QbaraError(f"{what}: {prefix}{fmt.name} stores blocks of {fmt.block_size} weights along a row, "
                         f"which do not divide its {d_in} input features; {hint}, or leave this layer out")


def quantize_ggml(weight: Tensor, fmt: str | GGMLFormat, name: str = "weight",
                  importance: Tensor | None = None) -> Tensor:
    """(d_out, row bytes) uint8 GGML blocks of a 2-D float weight. `importance`: None (reference quantizer), a
    (d_in,) importance matrix or a (d_out, d_in) per-weight tensor weighting each block's search."""
    fmt = fmt if isinstance(fmt, GGMLFormat) else _ggml_format(fmt)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        what = getattr(weight, "dtype", type(weight).__name__)
        raise QbaraError(f"{name}: GGML quantization takes a float weight, got {what}; pass the float weight")
    check_ggml_shape(tuple(weight.shape), fmt, name)
    d_out, d_in = weight.shape
    if importance is not None:
        importance = check_importance(importance, (d_out, d_in), name).to(weight.device)
    out = torch.empty(d_out, fmt.row_bytes(d_in), dtype=torch.uint8, device=weight.device)
    rows = max(1, CHUNK_ELEMENTS // max(d_in, 1))
    for start in range(0, d_out, rows):
        chunk = weight[start:start + rows].detach().to(torch.float32)
        if importance is None:
            blocks = fmt.quantize_blocks(chunk.reshape(-1, fmt.block_size))
        else:
            part = importance.expand(d_out, d_in)[start:start + rows]
            row_sigma2 = div(seq_sum((chunk * chunk).t().contiguous()), d_in)  # ggml: sum of squares / n_per_row
            blocks = fmt.quantize_blocks(chunk.reshape(-1, fmt.block_size), part.reshape(-1, fmt.block_size),
                                         row_sigma2.repeat_interleave(d_in // fmt.block_size))
        out[start:start + rows] = blocks.view(-1, out.shape[1])
    return out


def check_importance(importance, shape: tuple[int, int], name: str = "weight") -> Tensor:
    """`importance` as fp32 after checking it is (d_in,) or (d_out, d_in), finite, >= 0."""
    d_out, d_in = shape
    if not isinstance(importance, Tensor) or not importance.is_floating_point():
        what = getattr(importance, "dtype", type(importance).__name__)
        raise QbaraError(f"{name}: the rounding importance must be a float tensor, got {what}; pass a (d_in,) "
                         f"importance matrix or a (d_out, d_in) tensor such as a Fisher diagonal")
    if tuple(importance.shape) not in ((d_in,), (d_out, d_in)):
        raise QbaraError(f"{name}: the rounding importance has shape {tuple(importance.shape)}, the weight "
                         f"{(d_out, d_in)}; pass one value per input column ({d_in},) or per weight {(d_out, d_in)}")
    importance = importance.detach().to(torch.float32)
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise QbaraError(f"{name}: the rounding importance has negative, NaN or Inf values; it must be finite "
                         f"and >= 0 (a mean square activation or a Fisher diagonal)")
    return importance


def dequantize_ggml(raw: Tensor, shape: tuple[int, int], fmt: str | GGMLFormat,
                    out: Tensor | None = None) -> Tensor:
    """fp32 (d_out, d_in) weight held by GGML bytes `raw` (2-D or flat), written into `out` when given."""
    fmt = fmt if isinstance(fmt, GGMLFormat) else _ggml_format(fmt)
    d_out, d_in = shape
    check_ggml_shape((d_out, d_in), fmt)
    if raw.dtype != torch.uint8 or raw.numel() != d_out * fmt.row_bytes(d_in):
        raise QbaraError(f"{fmt.name} bytes for a {d_out}x{d_in} weight must be {d_out * fmt.row_bytes(d_in)} "
                         f"uint8, got {raw.numel()} {raw.dtype}; pass the buffer quantize_ggml returned")
    if out is None:
        out = torch.empty(d_out * d_in, dtype=torch.float32, device=raw.device)
    fmt.dequantize_blocks(raw.reshape(-1, fmt.type_size), out.view(-1, fmt.block_size))
    return out.view(d_out, d_in)


def _bind(fmt: GGMLFormat) -> tuple[Callable, Callable]:
    def quantize(weight: Tensor) -> Tensor:
        return quantize_ggml(weight, fmt)

    def dequantize(raw: Tensor, shape: tuple[int, int]) -> Tensor:
        return dequantize_ggml(raw, shape, fmt)

    quantize.__name__, dequantize.__name__ = f"quantize_{fmt.name}", f"dequantize_{fmt.name}"
    quantize.__doc__ = f"(d_out, d_in) float weight -> (d_out, row bytes) uint8 {fmt.name.upper()} blocks."
    dequantize.__doc__ = f"{fmt.name.upper()} block bytes -> the fp32 (d_out, d_in) weight."
    return quantize, dequantize


quantize_q8_0, dequantize_q8_0 = _bind(GGML_FORMATS["q8_0"])

__all__ = [
    "CHUNK_ELEMENTS", "FP16_MAX", "GGML_FORMATS", "check_ggml_shape", "check_importance", "dequantize_ggml",
    "dequantize_q8_0", "pack_q4_1", "pack_q5_1", "quantize_ggml", "quantize_q8_0",
]
