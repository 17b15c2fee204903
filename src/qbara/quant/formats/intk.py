"""INT-k: affine codes, fp16 scale, float minimum per block. INT4 / INT5 in 1 x 32 blocks with fp16 minima are
GGUF's Q4_1 / Q5_1, written exactly; the float minimum lets block-constant updates fold in (`fold_problem`)."""
from __future__ import annotations

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.formats.base import MINIMUM_DTYPES, BlockFormat, check_minimum_dtype, meta
from qbara.quant.ggml import GGML_FORMATS, pack_q4_1, pack_q5_1
from qbara.quant.intk import dequantize_int, quantize_int
from qbara.quant.packing import pack_bits, packed_nbytes, unpack_bits

# Code width -> (GGML format, packer) of the INT formats whose 1 x 32 blocks with fp16 minima are a GGUF layout.
_EXACT_GGUF = {4: (GGML_FORMATS["q4_1"], pack_q4_1), 5: (GGML_FORMATS["q5_1"], pack_q5_1)}
_MINIMUM_TORCH = {"fp16": torch.float16, "fp32": torch.float32}


class IntFormat(BlockFormat):
    """int2..int8. Buffers: `codes` (packed), `scale` fp16, `minimum` fp16 or fp32, one per block."""

    name = "int"
    prefix = "int"
    formats = ("int2", "int3", "int4", "int5", "int8")
    default_block_size = 32  # as in GGUF Q4_1 / Q5_1
    takes_gptq = True

    def check_options(self, config) -> None:
        if config.double_quant:
            raise QbaraError("double_quant applies to NF formats only: drop it for int formats (their fp16 "
                             "scale and min are what lets adapters fold in exactly)")
        check_minimum_dtype(config)

    def bits_per_param(self, config) -> float:
        return config.bits + (16 + MINIMUM_DTYPES[config.minimum_dtype]) / config.block_numel

    def label(self, config) -> str:
        rows = f"x{config.block_rows}" if config.block_rows > 1 else ""
        minimum = "-m32" if config.minimum_dtype == "fp32" else ""
        return f"{config.format}-g{config.block_size}{rows}{minimum}"

    def quantize(self, weight: Tensor, config, name: str, importance: Tensor | None) -> dict[str, Tensor]:
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        minimum_dtype = _MINIMUM_TORCH[config.minimum_dtype]
        parts = [quantize_int(weight[start:start + rows], config.bits, config.block_size, config.block_rows,
                              minimum_dtype) for start, rows in self.row_chunks(shape, config)]
        return {"codes": torch.cat([pack_bits(codes, config.bits) for codes, _, _ in parts]),
                "scale": torch.cat([scale for _, scale, _ in parts]),
                "minimum": torch.cat([minimum for _, _, minimum in parts])}

    def codes(self, qtensor) -> Tensor:
        return unpack_bits(qtensor.tensors["codes"], qtensor.config.bits, qtensor.numel)

    def dequantize(self, qtensor, dtype: torch.dtype) -> Tensor:
        c, t = qtensor.config, qtensor.tensors
        return dequantize_int(t["codes"], t["scale"], t["minimum"], qtensor.shape, c.block_size, c.block_rows,
                              dtype, bits=c.bits)

    def dequantize_into(self, qtensor, out: Tensor) -> Tensor | None:
        c, t = qtensor.config, qtensor.tensors
        if 8 % c.bits or c.block_rows != 1:
            return None
        return dequantize_int(t["codes"], t["scale"], t["minimum"], qtensor.shape, c.block_size, bits=c.bits,
                              out=out)

    def buffer_layout(self, config, shape: tuple[int, int]) -> dict[str, Tensor]:
        numel = shape[0] * shape[1]
        n_blocks = numel // config.block_numel
        return {"codes": meta((packed_nbytes(numel, config.bits),), torch.uint8),
                "scale": meta((n_blocks,), torch.float16),
                "minimum": meta((n_blocks,), _MINIMUM_TORCH[config.minimum_dtype])}

    def gguf_format(self, config):
        """Q4_1 / Q5_1 for INT4 / INT5 with 1 x 32 blocks and fp16 minima (their own layout), else None."""
        exact = _EXACT_GGUF.get(config.bits)
        if exact is None or config.block_size != 32 or config.block_rows != 1 or config.minimum_dtype != "fp16":
            return None
        return exact[0]

    def gguf_blocks(self, qtensor, name: str) -> Tensor:
        fmt = self.gguf_format(qtensor.config)
        if fmt is None:
            return super().gguf_blocks(qtensor, name)
        kind = fmt.name.upper()
        d_out, d_in = qtensor.shape
        scale = _as_fp16(qtensor.tensors["scale"], name, kind)
        minimum = _as_fp16(qtensor.tensors["minimum"], name, kind)
        return _EXACT_GGUF[qtensor.config.bits][1](qtensor.codes(), scale, minimum, (d_out, d_in))

    def fold_problem(self, config, tile_rows: int, tile_cols: int) -> str | None:
        """Every quantization block must lie inside one tile; its float minimum then absorbs the constant exactly."""
        if tile_cols % config.block_size or tile_rows % config.block_rows:
            return (f"the update is constant on {tile_rows}x{tile_cols} tiles but the base's blocks are "
                    f"{config.block_rows}x{config.block_size}; each block must lie inside one tile "
                    f"(input pooling a multiple of {config.block_size}, output repetition a multiple of "
                    f"{config.block_rows})")
        return None


def _as_fp16(values: Tensor, name: str, kind: str = "Q4_1") -> Tensor:
    """Scales / minima as fp16 for Q4_1 / Q5_1, refusing values fp16 cannot hold exactly (e.g. after a bf16 cast)."""
    if values.dtype == torch.float16:
        return values
    half = values.to(torch.float16)
    if not torch.equal(half.to(values.dtype), values):
        raise QbaraError(f"{name}: its {values.dtype} scales or minima are not exact in fp16, so the layer "
                         f"cannot be written as {kind} exactly; keep QuantizedLinear buffers in fp16 (do not "
                         f"cast the quantized model) or pass lossy=True")
    return half


INT = IntFormat()
