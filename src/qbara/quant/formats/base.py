"""`QuantFormat`: what one family of quantization formats (NF, INT, GGML blocks) knows about itself; code outside
`qbara.quant.formats` asks `config.family` a capability (`takes_importance`, `fold_problem`) instead of a name."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qbara.errors import QbaraError


class QuantFormat:
    """One family of formats: subclasses set the class attributes and implement what raises NotImplementedError."""

    name: str = ""                         # QuantConfig.kind
    formats: tuple[str, ...] = ()          # the QuantConfig.format names it owns
    prefix: str = ""                       # what its format names start with
    fixed_block: bool = False              # the format name fixes the block (no block_size / block_rows to choose)
    takes_importance: bool = False         # quantize(importance=) weights the rounding
    nf_levels: bool = False                # values are NF levels x block absmax (`qbara.quant.nf`): LQ rounds them
                                           # without packing and stores low-rank factors in them
    stores_gguf_blocks: bool = False       # the stored buffer is the GGUF block bytes themselves
    takes_gptq: bool = False               # GPTQ (`qbara.quant.gptq`) produces its codes (1 x G row groups)

    # ---------------------------------------------------------------- config
    def normalize(self, config) -> None:
        """Fill `config`'s defaults for this family (on the frozen dataclass) and refuse options it does not take."""
        raise NotImplementedError

    def bits(self, config) -> int:
        return int(config.format[len(self.prefix):])

    def bits_per_param(self, config) -> float:
        """Storage bits per weight by formula."""
        raise NotImplementedError

    def label(self, config) -> str:
        return config.format

    def block_rows(self, config) -> int:
        return 1

    def check_shape(self, config, shape: tuple[int, ...], name: str) -> None:
        """Raise a QbaraError naming `name` unless a `shape` weight can be quantized with `config`."""
        if len(shape) != 2:
            raise QbaraError(f"{name}: only 2-D weights can be quantized, got shape {tuple(shape)}")

    # ---------------------------------------------------------------- tensors
    def quantize(self, weight: Tensor, config, name: str, importance: Tensor | None) -> dict[str, Tensor]:
        """The buffers of a checked, finite 2-D float weight."""
        raise NotImplementedError

    def dequantize(self, qtensor, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def dequantize_into(self, qtensor, out: Tensor) -> Tensor | None:
        """The fp32 weight written into the flat fp32 buffer `out`, or None where there is no in-place path."""
        return None

    def codes(self, qtensor) -> Tensor:
        raise QbaraError(f"{qtensor.config.format} has no separate codes; read the weight with dequantize()")

    def scales(self, qtensor) -> Tensor:
        raise QbaraError(f"{qtensor.config.format} has no separate scales; read the weight with dequantize()")

    def buffer_layout(self, config, shape: tuple[int, int]) -> dict[str, Tensor]:
        """Name -> meta tensor (shape, dtype) of each buffer a `shape` weight gets; by default from quantizing zeros."""
        buffers = self.quantize(torch.zeros(shape), config, "layout", None)
        return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in buffers.items()}

    # ---------------------------------------------------------------- GGUF and folding
    def gguf_format(self, config):
        """The `qbara.quant.ggml.GGMLFormat` a tensor of `config` is written to GGUF as exactly, or None."""
        return None

    def gguf_blocks(self, qtensor, name: str) -> Tensor:
        """The (d_out, row bytes) uint8 blocks of `gguf_format(qtensor.config)` holding exactly this tensor."""
        raise QbaraError(f"{name}: {qtensor.config.label} has no GGUF block layout to write exactly")

    def fold_problem(self, config, tile_rows: int, tile_cols: int) -> str | None:
        """Why an update constant on (tile_rows x tile_cols) tiles cannot fold into a base of `config`, or None."""
        return f"{config.format} has no zero-point an update could be folded into"


# ==================================================================== block formats (NF, INT)
DQ_DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}
MINIMUM_DTYPES = {"fp16": 16, "fp32": 32}  # INT block minimum storage -> bits
_DQ_STYLES = ("qbara", "bnb")
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
# Rows quantized at once: the quantizer's fp32 work arrays stay near 4 M elements (~16 MB each) whatever the
# matrix size, instead of several full-size copies of a 7B model's 45 M-element MLP weights.
CHUNK_ELEMENTS = 1 << 22


class BlockFormat(QuantFormat):
    """Shared part of NF and INT: chosen block geometry, packed codes, per-block float statistics."""

    default_block_size: int = 64
    default_double_quant: bool = False

    def normalize(self, config) -> None:
        if config.block_size is None:
            object.__setattr__(config, "block_size", self.default_block_size)
        if not isinstance(config.block_size, int) or config.block_size <= 0:
            raise QbaraError(f"block_size must be a positive integer, got {config.block_size!r}")
        if not isinstance(config.block_rows, int) or config.block_rows <= 0:
            raise QbaraError(f"block_rows must be a positive integer, got {config.block_rows!r}")
        if config.double_quant is None:
            object.__setattr__(config, "double_quant", self.default_double_quant)
        self.check_options(config)
        if config.double_quant:
            if config.dq_bits not in (2, 3, 4, 8):
                raise QbaraError(f"dq_bits must be one of 2, 3, 4, 8, got {config.dq_bits!r}")
            if config.dq_dtype not in DQ_DTYPE_BITS:
                raise QbaraError(f"dq_dtype must be one of {', '.join(DQ_DTYPE_BITS)}, got {config.dq_dtype!r}")
            if not isinstance(config.dq_block_size, int) or config.dq_block_size <= 0:
                raise QbaraError(f"dq_block_size must be a positive integer, got {config.dq_block_size!r}")
        _check_dq_style(config)

    def check_options(self, config) -> None:
        """The family's own option rules, after the geometry defaults are set."""
        check_minimum_dtype(config)

    def block_rows(self, config) -> int:
        return config.block_rows

    def check_shape(self, config, shape: tuple[int, ...], name: str) -> None:
        super().check_shape(config, shape, name)
        d_out, d_in = shape
        if d_in % config.block_size:
            divisors = [b for b in (16, 32, 64, 128, 256) if d_in % b == 0]
            raise QbaraError(
                f"{name}: block_size {config.block_size} does not divide its {d_in} input features; "
                f"use a block_size that divides {d_in} (e.g. {divisors or [1]}) or leave this layer out")
        if d_out % config.block_rows:
            raise QbaraError(f"{name}: block_rows {config.block_rows} does not divide its {d_out} output "
                             f"features; choose block_rows dividing {d_out}")

    def row_chunks(self, shape: tuple[int, int], config) -> list[tuple[int, int]]:
        """(first row, rows) pieces that quantize independently: whole row blocks, whole packed bytes."""
        d_out, d_in = shape
        step = math.lcm(self.block_rows(config), 8)
        if d_out % step:
            return [(0, d_out)]
        rows = max(step, CHUNK_ELEMENTS // max(d_in, 1) // step * step)
        return [(start, min(rows, d_out - start)) for start in range(0, d_out, rows)]


def check_minimum_dtype(config) -> None:
    if config.minimum_dtype not in MINIMUM_DTYPES:
        raise QbaraError(f"minimum_dtype must be one of {', '.join(MINIMUM_DTYPES)}, got {config.minimum_dtype!r}")


def _check_dq_style(config) -> None:
    """dq_style="bnb" only where bitsandbytes' own layout can hold the config."""
    if config.dq_style not in _DQ_STYLES:
        raise QbaraError(f"dq_style must be one of {', '.join(_DQ_STYLES)}, got {config.dq_style!r}")
    if config.dq_style == "qbara":
        return
    fix = "or use dq_style='qbara'"
    if config.format != "nf4":
        raise QbaraError(f"dq_style='bnb' is bitsandbytes' NF4 double quantization: use format 'nf4' "
                         f"(bitsandbytes has no {config.format}), {fix}")
    if not config.double_quant:
        raise QbaraError("dq_style='bnb' describes a double quantization: set double_quant=True, or drop "
                         "dq_style (NF4 with fp32 absmax is bitsandbytes' layout without compress_statistics)")
    if config.block_size not in BNB_BLOCK_SIZES:
        raise QbaraError(f"dq_style='bnb': bitsandbytes has no NF4 block size {config.block_size}; use one of "
                         f"{', '.join(map(str, BNB_BLOCK_SIZES))}, {fix}")
    wanted = {"dq_bits": 8, "dq_block_size": 256, "dq_dtype": "fp32"}
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong:
        raise QbaraError(f"dq_style='bnb' fixes bitsandbytes' scale layout (dq_bits=8, dq_block_size=256, "
                         f"dq_dtype='fp32'), got {wrong}: leave them at these defaults, {fix}")


def meta(shape, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")
