"""Quantization configuration: format, block geometry, double quantization, and bits/param."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qbara.errors import QbaraError, check_types, strict_from_dict
from qbara.options import option
from qbara.quant.formats import QuantFormat, family_of
from qbara.quant.ggml import GGMLFormat


@dataclass(frozen=True)
class QuantConfig:
    """How a weight matrix is quantized (fields: see their option help). minimum_dtype fp32 lets adapters folded into
    the minima lose nothing to rounding; dq_style "bnb" is bitsandbytes' `compress_statistics=True` (NF4 only)."""

    format: str = option("nf4", "nf2/nf3/nf4/nf8 (NormalFloat), int2/int3/int4/int5/int8 (affine) or "
                                "gguf:q4_0 ... gguf:q6_k (llama.cpp's block formats)")
    block_size: int | None = option(None, "weights per scale along a row (default 64 for NF, 32 for INT; fixed for "
                                          "gguf formats)")
    block_rows: int = option(1, "INT only: rows per block (2-D tiles); 1 = 1 x block_size blocks")
    double_quant: bool | None = option(None, "NF only: quantize the absmax scales too (default on for NF, as in "
                                             "QLoRA)")
    dq_bits: int = option(8, "double quantization: bits of each quantized scale (2, 3, 4 or 8)")
    dq_block_size: int = option(256, "double quantization: scales per second-level block")
    dq_dtype: str = option("fp32", "double quantization: storage of the second-level scales (fp32, bf16, fp16)")
    minimum_dtype: str = option("fp16", "INT only: storage of each block's minimum (fp16 as in GGUF, or fp32)")
    dq_style: str = option("qbara", "double quantization layout: qbara, or bnb (bitsandbytes' NF4 "
                                    "compress_statistics bit for bit)")

    def __post_init__(self):
        check_types(self, {"format": ((str,), False), "block_size": ((int,), True), "block_rows": ((int,), False),
                           "double_quant": ((bool,), True), "dq_bits": ((int,), False),
                           "dq_block_size": ((int,), False), "dq_dtype": ((str,), False),
                           "minimum_dtype": ((str,), False), "dq_style": ((str,), False)})
        self.family.normalize(self)

    @property
    def family(self) -> QuantFormat:
        return family_of(self.format)

    @property
    def kind(self) -> str:
        return self.family.name

    @property
    def ggml(self) -> GGMLFormat:
        """The GGML block format this config writes to GGUF as exactly."""
        fmt = self.family.gguf_format(self) if self.family.stores_gguf_blocks else None
        if fmt is None:
            raise QbaraError(f"{self.format} is not a GGML block format; use format='gguf:q4_k' etc.")
        return fmt

    @property
    def bits(self) -> int:
        return self.family.bits(self)

    @property
    def block_numel(self) -> int:
        return self.block_size * self.block_rows

    @property
    def bits_per_param(self) -> float:
        return self.family.bits_per_param(self)

    @property
    def label(self) -> str:
        """Short name, e.g. nf4-b64-dq8/fp32/256, int4-g32 or gguf:q4_k."""
        return self.family.label(self)

    def to_dict(self) -> dict:
        """The fields; dq_style only when not the default, so readers that predate it read default configs."""
        data = dataclasses.asdict(self)
        if data["dq_style"] == "qbara":
            del data["dq_style"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return strict_from_dict(cls, data)

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        self.family.check_shape(self, tuple(shape), name)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether this config can quantize a weight of `shape` (`check_shape` as a yes / no)."""
        try:
            self.check_shape(shape)
        except QbaraError:
            return False
        return True
