"""gguf:*: llama.cpp's GGML block formats, stored as the exact GGUF block bytes (`qbara.quant.ggml`)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.formats.base import QuantFormat, meta
from qbara.quant.ggml import FP16_MAX, GGML_FORMATS, GGMLFormat, check_ggml_shape, dequantize_ggml, quantize_ggml

PREFIX = "gguf:"


class GGMLFamily(QuantFormat):
    """The GGML block formats. One buffer: `codes`, the (d_out, row bytes) uint8 blocks."""

    name = "gguf"
    prefix = PREFIX
    formats = tuple(PREFIX + name for name in GGML_FORMATS)
    fixed_block = True
    takes_importance = True
    stores_gguf_blocks = True

    def ggml(self, config) -> GGMLFormat:
        return GGML_FORMATS[config.format[len(PREFIX):]]

    def normalize(self, config) -> None:
        fmt = self.ggml(config)
        if config.block_size is None:
            object.__setattr__(config, "block_size", fmt.block_size)
        if config.double_quant is None:
            object.__setattr__(config, "double_quant", False)
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        options = ("block_rows", "dq_bits", "dq_block_size", "dq_dtype", "minimum_dtype", "dq_style")
        extra = {k: getattr(config, k) for k in options if getattr(config, k) != defaults[k]}
        if config.block_size != fmt.block_size:
            extra["block_size"] = config.block_size
        if config.double_quant:
            extra["double_quant"] = True
        if extra:
            given = ", ".join(f"{k}={v!r}" for k, v in extra.items())
            raise QbaraError(f"{config.format} is GGML's fixed layout ({fmt.block_size} weights per block, "
                             f"{fmt.bits_per_param:g} bits/param) and takes no {given}: drop them, or pick "
                             f"another format")

    def bits(self, config) -> int:
        return self.ggml(config).bits

    def bits_per_param(self, config) -> float:
        return self.ggml(config).bits_per_param

    def check_shape(self, config, shape: tuple[int, ...], name: str) -> None:
        check_ggml_shape(tuple(shape), self.ggml(config), name, prefix=PREFIX)

    def quantize(self, weight: Tensor, config, name: str, importance: Tensor | None) -> dict[str, Tensor]:
        peak = float(weight.abs().max()) if weight.numel() else 0.0
        if peak > FP16_MAX:  # a block scale (at most the block's absmax) must fit fp16
            raise QbaraError(f"{name}: weights reach {peak:.3g}, beyond the fp16 range of {config.format}'s block "
                             f"scales; rescale the layer or use an nf/int format")
        return {"codes": quantize_ggml(weight, self.ggml(config), name, importance)}  # chunked by quantize_ggml

    def codes(self, qtensor) -> Tensor:
        raise QbaraError(f"{qtensor.config.format} keeps codes inside GGML blocks, with their scales; read the "
                         f"weight with dequantize(), or the raw blocks with tensors['codes']")

    def dequantize(self, qtensor, dtype: torch.dtype) -> Tensor:
        return dequantize_ggml(qtensor.tensors["codes"], qtensor.shape, self.ggml(qtensor.config)).to(dtype)

    def dequantize_into(self, qtensor, out: Tensor) -> Tensor | None:
        return dequantize_ggml(qtensor.tensors["codes"], qtensor.shape, self.ggml(qtensor.config), out=out)

    def buffer_layout(self, config, shape: tuple[int, int]) -> dict[str, Tensor]:
        return {"codes": meta((shape[0], self.ggml(config).row_bytes(shape[1])), torch.uint8)}

    def gguf_format(self, config) -> GGMLFormat:
        return self.ggml(config)

    def gguf_blocks(self, qtensor, name: str) -> Tensor:
        d_out, d_in = qtensor.shape
        return qtensor.tensors["codes"].reshape(d_out, self.ggml(qtensor.config).row_bytes(d_in))

    def fold_problem(self, config, tile_rows: int, tile_cols: int) -> str | None:
        return (f"{config.format} keeps GGML's block bytes, which an update cannot be folded into; quantize the "
                f"base with an int format (int4 with block_size=32 has gguf:q4_1's layout, int5 with block_size=32 "
                f"gguf:q5_1's; both are written to GGUF exactly)")


GGML = GGMLFamily()
