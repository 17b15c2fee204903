"""NF-k (NormalFloat, QLoRA): codes are the nearest of 2^k normal-quantile levels to w / block absmax; the
absmax is stored in fp32 or double-quantized (qbara's configurable form, or bitsandbytes' NF4 layout)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.double_quant import DQ_DTYPES, double_dequantize, double_quantize
from qbara.quant.dq_bnb import DYNAMIC_BLOCK, bnb_double_dequantize, bnb_double_quantize
from qbara.quant.formats.base import DQ_DTYPE_BITS, BlockFormat, check_minimum_dtype, meta
from qbara.quant.nf import block_absmax, dequantize_nf, round_nf
from qbara.quant.packing import pack_bits, packed_nbytes, unpack_bits


class NFFormat(BlockFormat):
    """nf2 / nf3 / nf4 / nf8. Buffers: `codes` (packed) and `absmax` fp32, or with double quant `absmax_codes`,
    `absmax_group_max`, `absmax_offset` (dq_style="bnb": `absmax_codes`, `nested_absmax`, `absmax_offset`)."""

    name = "nf"
    prefix = "nf"
    formats = ("nf2", "nf3", "nf4", "nf8")
    nf_levels = True
    default_block_size = 64  # as in QLoRA
    default_double_quant = True

    def check_options(self, config) -> None:
        check_minimum_dtype(config)
        if config.minimum_dtype != "fp16":
            raise QbaraError("minimum_dtype applies to int formats only: NF blocks store an absmax, no minimum")
        if config.block_rows != 1:
            raise QbaraError("block_rows applies to int formats only: NF blocks run along a row")

    def bits_per_param(self, config) -> float:
        if not config.double_quant:
            return config.bits + 32 / config.block_size
        return (config.bits + config.dq_bits / config.block_size
                + DQ_DTYPE_BITS[config.dq_dtype] / (config.block_size * config.dq_block_size))

    def label(self, config) -> str:
        dq = f"-dq{config.dq_bits}/{config.dq_dtype}/{config.dq_block_size}" if config.double_quant else ""
        style = "-bnb" if config.dq_style == "bnb" else ""
        return f"{config.format}-b{config.block_size}{dq}{style}"

    def quantize(self, weight: Tensor, config, name: str, importance: Tensor | None) -> dict[str, Tensor]:
        # Scales first (double quantization has one offset per matrix), then codes rounded against the scales
        # as stored: the nearest levels to w / (double-dequantized absmax).
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        chunks = [weight[start:start + rows] for start, rows in self.row_chunks(shape, config)]
        absmax = torch.cat([block_absmax(c, config.block_size) for c in chunks])
        tensors = {}
        if config.double_quant and config.dq_style == "bnb":
            # bitsandbytes rounds the codes against the exact absmax and compresses the scales afterwards
            s_codes, nested_absmax, offset = bnb_double_quantize(absmax)
            tensors.update(absmax_codes=s_codes, nested_absmax=nested_absmax, absmax_offset=offset)
            scales = absmax
        elif config.double_quant:
            s_codes, group_max, offset = double_quantize(absmax, config.dq_bits, config.dq_block_size,
                                                         config.dq_dtype)
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
        return {"codes": torch.cat(packed), **tensors}

    def codes(self, qtensor) -> Tensor:
        return unpack_bits(qtensor.tensors["codes"], qtensor.config.bits, qtensor.numel)

    def scales(self, qtensor) -> Tensor:
        """The (double-dequantized) fp32 absmax of each block."""
        t, c = qtensor.tensors, qtensor.config
        if not c.double_quant:
            return t["absmax"].float()
        if c.dq_style == "bnb":
            return bnb_double_dequantize(t["absmax_codes"], t["nested_absmax"], t["absmax_offset"])
        n_blocks = qtensor.numel // c.block_size
        codes = unpack_bits(t["absmax_codes"], c.dq_bits, n_blocks)
        return double_dequantize(codes, t["absmax_group_max"], t["absmax_offset"], c.dq_bits, c.dq_block_size)

    def dequantize(self, qtensor, dtype: torch.dtype) -> Tensor:
        c = qtensor.config
        return dequantize_nf(qtensor.tensors["codes"], qtensor.scales(), c.bits, c.block_size, dtype,
                             packed=True).view(qtensor.shape)

    def dequantize_into(self, qtensor, out: Tensor) -> Tensor | None:
        c = qtensor.config
        if 8 % c.bits:
            return None
        return dequantize_nf(qtensor.tensors["codes"], qtensor.scales(), c.bits, c.block_size, packed=True,
                             out=out).view(qtensor.shape)

    def buffer_layout(self, config, shape: tuple[int, int]) -> dict[str, Tensor]:
        numel = shape[0] * shape[1]
        n_blocks = numel // config.block_size
        layout = {"codes": meta((packed_nbytes(numel, config.bits),), torch.uint8)}
        if config.double_quant and config.dq_style == "bnb":
            layout.update(absmax_codes=meta((n_blocks,), torch.uint8),
                          nested_absmax=meta((math.ceil(n_blocks / DYNAMIC_BLOCK),), torch.float32),
                          absmax_offset=meta((1,), torch.float32))
        elif config.double_quant:
            layout.update(absmax_codes=meta((packed_nbytes(n_blocks, config.dq_bits),), torch.uint8),
                          absmax_group_max=meta((math.ceil(n_blocks / config.dq_block_size),),
                                                DQ_DTYPES[config.dq_dtype]),
                          absmax_offset=meta((1,), torch.float32))
        else:
            layout["absmax"] = meta((n_blocks,), torch.float32)
        return layout

    def fold_problem(self, config, tile_rows: int, tile_cols: int) -> str | None:
        return (f"{config.format} stores a scale per block but no zero-point, so nothing can absorb the "
                f"update; quantize the base with an int format (e.g. QuantConfig('int4', block_size=32))")


NF = NFFormat()
