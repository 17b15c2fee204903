"""`QuantizedTensor`: a packed quantized 2-D weight, and the `quantize` / `dequantize` entry points."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig
from qbara.quant.double_quant import double_dequantize, double_quantize
from qbara.quant.dq_bnb import bnb_double_dequantize, bnb_double_quantize
from qbara.quant.ggml import dequantize_ggml, quantize_ggml
from qbara.quant.intk import dequantize_int, quantize_int
from qbara.quant.nf import block_absmax, dequantize_nf, round_nf
from qbara.quant.packing import pack_bits, unpack_bits


@dataclass
class QuantizedTensor:
    """A quantized (d_out, d_in) weight held as packed buffers.

    NF: `codes` (packed), and `absmax` fp32 or, with double quant, `absmax_codes` (packed),
    `absmax_group_max`, `absmax_offset`; with dq_style="bnb", bitsandbytes' buffers: `absmax_codes` (uint8),
    `nested_absmax` (fp32 per 256 scales), `absmax_offset`. INT: `codes` (packed), `scale` fp16, `minimum` fp16
    (or fp32). GGUF (gguf:*): `codes`, the (d_out, row bytes) uint8 GGML blocks exactly as a GGUF file
    stores them (codes, scales and minima interleaved per block).
    """

    config: QuantConfig
    shape: tuple[int, int]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of all stored buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_param(self) -> float:
        """Bits per weight measured from the actual buffers."""
        return 8 * self.nbytes / self.numel

    def codes(self) -> Tensor:
        """Unpacked integer codes, one uint8 per weight, row-major."""
        if self.config.kind == "gguf":
            raise QbaraError(f"{self.config.format} keeps codes inside GGML blocks, with their scales; read the "
                             f"weight with dequantize(), or the raw blocks with tensors['codes']")
        return unpack_bits(self.tensors["codes"], self.config.bits, self.numel)

    def scales(self) -> Tensor:
        """NF: the (double-dequantized) fp32 absmax of each block."""
        t, c = self.tensors, self.config
        if not c.double_quant:
            return t["absmax"].float()
        if c.dq_style == "bnb":
            return bnb_double_dequantize(t["absmax_codes"], t["nested_absmax"], t["absmax_offset"])
        n_blocks = self.numel // c.block_size
        codes = unpack_bits(t["absmax_codes"], c.dq_bits, n_blocks)
        return double_dequantize(codes, t["absmax_group_max"], t["absmax_offset"], c.dq_bits, c.dq_block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (d_out, d_in) weight in `dtype` (codes are looked up straight from the packed bytes)."""
        c, packed = self.config, self.tensors["codes"]
        if c.kind == "gguf":
            return dequantize_ggml(packed, self.shape, c.ggml).to(dtype)
        if c.kind == "nf":
            return dequantize_nf(packed, self.scales(), c.bits, c.block_size, dtype, packed=True).view(self.shape)
        return dequantize_int(packed, self.tensors["scale"], self.tensors["minimum"], self.shape, c.block_size,
                              c.block_rows, dtype, bits=c.bits)

    def dequantize_into(self, out: Tensor) -> Tensor | None:
        """The fp32 weight written into `out` (a flat fp32 buffer of numel elements, reused by the caller so no
        fresh memory is faulted in per call), or None where this layout has no in-place path (3- and 5-bit codes,
        2-D INT tiles). The same `dequantize_nf` / `dequantize_int` / `dequantize_ggml` as `dequantize`."""
        c, packed = self.config, self.tensors["codes"]
        if c.kind == "gguf":
            return dequantize_ggml(packed, self.shape, c.ggml, out=out)
        if 8 % c.bits or (c.kind == "int" and c.block_rows != 1):
            return None
        if c.kind == "nf":
            return dequantize_nf(packed, self.scales(), c.bits, c.block_size, packed=True, out=out).view(self.shape)
        return dequantize_int(packed, self.tensors["scale"], self.tensors["minimum"], self.shape, c.block_size,
                              bits=c.bits, out=out)

    @property
    def device(self) -> torch.device:
        """Where the packed buffers live (PEFT reads `layer.qweight.device` to place adapters)."""
        return self.tensors["codes"].device

    def to(self, device) -> "QuantizedTensor":
        return QuantizedTensor(self.config, self.shape, {k: v.to(device) for k, v in self.tensors.items()})


def quantize(weight: Tensor, config: QuantConfig, name: str = "weight",
             importance: Tensor | None = None) -> QuantizedTensor:
    """Quantize a floating 2-D weight with `config`; `name` is used in error messages. `importance` (gguf:*
    formats only): a (d_in,) importance matrix or a (d_out, d_in) per-weight importance that weights each block's
    scale search, as llama-quantize does with an importance matrix (see `qbara.quant.ggml.quantize_ggml`)."""
    if importance is not None and config.kind != "gguf":
        raise QbaraError(f"{name}: an importance weights the rounding of gguf:* formats only, and {config.format} "
                         f"rounds each weight to its nearest level; drop importance= or choose a gguf:* format")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise QbaraError(f"{name}: cannot quantize a non-floating weight ({dtype}); pass the float weight "
                         f"(dequantize it first if it is already quantized)")
    config.check_shape(tuple(weight.shape), name)
    extremes = [float(v) for v in torch.aminmax(weight)] if weight.numel() else [0.0]  # one pass, NaN propagates
    if not all(math.isfinite(v) for v in extremes):
        raise QbaraError(f"{name}: weight contains NaN or Inf; fix the checkpoint before quantizing")
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if config.kind == "gguf":  # one buffer: the block bytes a GGUF file holds (chunked by the ggml module)
        if max(abs(v) for v in extremes) > FP16_MAX:  # a block scale (at most the block's absmax) must fit fp16
            raise QbaraError(f"{name}: weights reach {max(abs(v) for v in extremes):.3g}, beyond the fp16 range of "
                             f"{config.format}'s block scales; rescale the layer or use an nf/int format")
        return QuantizedTensor(config, shape, {"codes": quantize_ggml(weight, config.ggml, name, importance)})
    chunks = [weight[start:start + rows] for start, rows in _row_chunks(shape, config)]
    if config.kind == "int":
        minimum_dtype = torch.float32 if config.minimum_dtype == "fp32" else torch.float16
        parts = [quantize_int(c, config.bits, config.block_size, config.block_rows, minimum_dtype) for c in chunks]
        tensors = {"codes": torch.cat([pack_bits(codes, config.bits) for codes, _, _ in parts]),
                   "scale": torch.cat([scale for _, scale, _ in parts]),
                   "minimum": torch.cat([minimum for _, _, minimum in parts])}
        return QuantizedTensor(config, shape, tensors)
    # NF: the scales first (double quantization has one offset per matrix), then the codes rounded against the
    # scales as stored, so double-quantized codes are the nearest levels to w / (double-dequantized absmax).
    # (bitsandbytes' own double quant, dq_style="bnb", rounds against the exact absmax instead. Without double
    # quant the stored scale is the exact absmax and codes equal bitsandbytes'.)
    absmax = torch.cat([block_absmax(c, config.block_size) for c in chunks])
    tensors = {}
    if config.double_quant and config.dq_style == "bnb":
        # bitsandbytes compresses the scales after rounding the codes (checked against quantize_4bit(...,
        # compress_statistics=True)): codes against the exact absmax, the scales stored are not those.
        s_codes, nested_absmax, offset = bnb_double_quantize(absmax)
        tensors.update(absmax_codes=s_codes, nested_absmax=nested_absmax, absmax_offset=offset)
        scales = absmax
    elif config.double_quant:
        s_codes, group_max, offset = double_quantize(absmax, config.dq_bits, config.dq_block_size, config.dq_dtype)
        tensors.update(absmax_codes=pack_bits(s_codes, config.dq_bits), absmax_group_max=group_max,
                       absmax_offset=offset)
        scales = double_dequantize(s_codes, group_max, offset, config.dq_bits, config.dq_block_size)
    else:
        tensors["absmax"] = scales = absmax
    packed, start = [], 0
    for chunk in chunks:
        n_blocks = chunk.numel() // config.block_size
        codes = round_nf(chunk, config.bits, config.block_size, scales[start:start + n_blocks])
        packed.append(pack_bits(codes, config.bits))
        start += n_blocks
    tensors = {"codes": torch.cat(packed), **tensors}
    return QuantizedTensor(config, shape, tensors)


# Rows quantized at once: the quantizer's fp32 work arrays stay near 4 M elements (~16 MB each) whatever the
# matrix size, instead of several full-size copies of a 7B model's 45 M-element MLP weights.
CHUNK_ELEMENTS = 1 << 22
FP16_MAX = 65504.0


def _row_chunks(shape: tuple[int, int], config: QuantConfig) -> list[tuple[int, int]]:
    """(first row, rows) pieces of a weight that quantize independently: whole row blocks, and a whole number
    of packed bytes (rows a multiple of 8, so any code width packs to whole bytes)."""
    d_out, d_in = shape
    step = math.lcm(config.block_rows if config.kind == "int" else 1, 8)
    if d_out % step:
        return [(0, d_out)]
    rows = max(step, CHUNK_ELEMENTS // max(d_in, 1) // step * step)
    return [(start, min(rows, d_out - start)) for start in range(0, d_out, rows)]


def dequantize(qtensor: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Functional form of `QuantizedTensor.dequantize`."""
    return qtensor.dequantize(dtype)
