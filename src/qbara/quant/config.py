"""Quantization configuration: format, block geometry, double quantization, and bits/param."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qbara.errors import QbaraError, check_types, strict_from_dict
from qbara.options import option
from qbara.quant.ggml import GGML_FORMATS, GGMLFormat, check_ggml_shape

NF_BITS = (2, 3, 4, 8)
INT_BITS = (2, 3, 4, 5, 8)
GGUF_PREFIX = "gguf:"
GGUF_FORMATS = tuple(GGUF_PREFIX + name for name in GGML_FORMATS)  # GGML block formats: gguf:q4_0 ... gguf:q6_k
FORMATS = tuple(f"nf{b}" for b in NF_BITS) + tuple(f"int{b}" for b in INT_BITS) + GGUF_FORMATS
DQ_DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}
MINIMUM_DTYPES = {"fp16": 16, "fp32": 32}  # INT block minimum storage -> bits
DQ_STYLES = ("qbara", "bnb")
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these


@dataclass(frozen=True)
class QuantConfig:
    """How a weight matrix is quantized.

    format: nf2/nf3/nf4/nf8 (NormalFloat, block-wise absmax), int2/int3/int4/int5/int8 (affine, float min), or
        gguf:q4_0/q4_1/q5_0/q5_1/q8_0/q2_k/q3_k/q4_k/q5_k/q6_k/iq4_nl/iq4_xs (llama.cpp's GGML block formats,
        stored as the exact GGUF block bytes and quantized as ggml's reference quantizer does; `qbara.quant.ggml`).
        A gguf format fixes its own block (32 or 256 weights along a row) and takes none of the other options.
    block_size: NF block B0, or INT group G, along the input features of a row (default: 64 for NF as in
        QLoRA, 32 for INT as in GGUF Q4_1 / Q5_1).
    block_rows: INT only, rows per block (2-D tiles for QA-HiRA's tile setting); 1 = 1 x G blocks.
    double_quant: NF only, quantize the absmax scales (default on for NF, as in QLoRA).
    dq_bits, dq_block_size, dq_dtype: b0, B1 and b1 of the scale quantization.
    minimum_dtype: INT only, storage of each block's float minimum: fp16 (default; GGUF Q4_1's / Q5_1's layout) or
        fp32 (+0.5 bits/param at G=32; an adapter folded into the minima then loses nothing to rounding).
    dq_style: "qbara" (default: min offset, unsigned b0-bit codes, codes rounded against the stored scales) or
        "bnb": bitsandbytes' `compress_statistics=True` bit for bit (NF4 only; mean offset, 8-bit dynamic map
        in blocks of 256, codes rounded against the exact absmax; `qbara.quant.dq_bnb`).
    """

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
        if self.format not in FORMATS:
            raise QbaraError(f"unknown quantization format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.kind == "gguf":
            return self._check_gguf()
        if self.block_size is None:
            object.__setattr__(self, "block_size", 64 if self.kind == "nf" else 32)
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise QbaraError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.block_rows, int) or self.block_rows <= 0:
            raise QbaraError(f"block_rows must be a positive integer, got {self.block_rows!r}")
        if self.double_quant is None:
            object.__setattr__(self, "double_quant", self.kind == "nf")
        if self.kind == "int" and self.double_quant:
            raise QbaraError("double_quant applies to NF formats only: drop it for int formats (their fp16 "
                             "scale and min are what lets adapters fold in exactly)")
        if self.minimum_dtype not in MINIMUM_DTYPES:
            raise QbaraError(f"minimum_dtype must be one of {', '.join(MINIMUM_DTYPES)}, got {self.minimum_dtype!r}")
        if self.kind == "nf" and self.minimum_dtype != "fp16":
            raise QbaraError("minimum_dtype applies to int formats only: NF blocks store an absmax, no minimum")
        if self.kind == "nf" and self.block_rows != 1:
            raise QbaraError("block_rows applies to int formats only: NF blocks run along a row")
        if self.double_quant:
            if self.dq_bits not in (2, 3, 4, 8):
                raise QbaraError(f"dq_bits must be one of 2, 3, 4, 8, got {self.dq_bits!r}")
            if self.dq_dtype not in DQ_DTYPE_BITS:
                raise QbaraError(f"dq_dtype must be one of {', '.join(DQ_DTYPE_BITS)}, got {self.dq_dtype!r}")
            if not isinstance(self.dq_block_size, int) or self.dq_block_size <= 0:
                raise QbaraError(f"dq_block_size must be a positive integer, got {self.dq_block_size!r}")
        self._check_dq_style()

    def _check_dq_style(self) -> None:
        """dq_style="bnb" only where bitsandbytes' own layout can hold the config."""
        if self.dq_style not in DQ_STYLES:
            raise QbaraError(f"dq_style must be one of {', '.join(DQ_STYLES)}, got {self.dq_style!r}")
        if self.dq_style == "qbara":
            return
        fix = "or use dq_style='qbara'"
        if self.format != "nf4":
            raise QbaraError(f"dq_style='bnb' is bitsandbytes' NF4 double quantization: use format 'nf4' "
                             f"(bitsandbytes has no {self.format}), {fix}")
        if not self.double_quant:
            raise QbaraError("dq_style='bnb' describes a double quantization: set double_quant=True, or drop "
                             "dq_style (NF4 with fp32 absmax is bitsandbytes' layout without compress_statistics)")
        if self.block_size not in BNB_BLOCK_SIZES:
            raise QbaraError(f"dq_style='bnb': bitsandbytes has no NF4 block size {self.block_size}; use one of "
                             f"{', '.join(map(str, BNB_BLOCK_SIZES))}, {fix}")
        wanted = {"dq_bits": 8, "dq_block_size": 256, "dq_dtype": "fp32"}
        wrong = {k: getattr(self, k) for k, v in wanted.items() if getattr(self, k) != v}
        if wrong:
            raise QbaraError(f"dq_style='bnb' fixes bitsandbytes' scale layout (dq_bits=8, dq_block_size=256, "
                             f"dq_dtype='fp32'), got {wrong}: leave them at these defaults, {fix}")

    def _check_gguf(self) -> None:
        """A GGML block format: its block is fixed, the NF / INT options do not apply."""
        fmt = self.ggml
        if self.block_size is None:
            object.__setattr__(self, "block_size", fmt.block_size)
        if self.double_quant is None:
            object.__setattr__(self, "double_quant", False)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        options = ("block_rows", "dq_bits", "dq_block_size", "dq_dtype", "minimum_dtype", "dq_style")
        extra = {k: getattr(self, k) for k in options if getattr(self, k) != defaults[k]}
        if self.block_size != fmt.block_size:
            extra["block_size"] = self.block_size
        if self.double_quant:
            extra["double_quant"] = True
        if extra:
            given = ", ".join(f"{k}={v!r}" for k, v in extra.items())
            raise QbaraError(f"{self.format} is GGML's fixed layout ({fmt.block_size} weights per block, "
                             f"{fmt.bits_per_param:g} bits/param) and takes no {given}: drop them, or pick "
                             f"another format")

    @property
    def kind(self) -> str:
        """'nf', 'int' or 'gguf'."""
        if self.format.startswith(GGUF_PREFIX):
            return "gguf"
        return "nf" if self.format.startswith("nf") else "int"

    @property
    def ggml(self) -> GGMLFormat:
        """The GGML block format of a gguf:* config."""
        if self.kind != "gguf":
            raise QbaraError(f"{self.format} is not a GGML block format; use format='gguf:q4_k' etc.")
        return GGML_FORMATS[self.format[len(GGUF_PREFIX):]]

    @property
    def bits(self) -> int:
        """Bits per weight code."""
        if self.kind == "gguf":
            return self.ggml.bits
        return int(self.format[len(self.kind):])

    @property
    def block_numel(self) -> int:
        """Weights sharing one scale."""
        return self.block_size * self.block_rows

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight by formula: b + b0/B0 + b1/(B0*B1) (NF with double quant, either dq_style),
        b + 32/B0 (NF, fp32 absmax), b + (16 + 16|32)/(G*rows) (INT, fp16 scale, fp16|fp32 min),
        8 * block bytes / block weights (gguf: Q4_K 4.5, Q6_K 6.5625)."""
        if self.kind == "gguf":
            return self.ggml.bits_per_param
        if self.kind == "int":
            return self.bits + (16 + MINIMUM_DTYPES[self.minimum_dtype]) / self.block_numel
        if not self.double_quant:
            return self.bits + 32 / self.block_size
        return (self.bits + self.dq_bits / self.block_size
                + DQ_DTYPE_BITS[self.dq_dtype] / (self.block_size * self.dq_block_size))

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. nf4-b64-dq8/fp32/256, nf4-b64-dq8/fp32/256-bnb, int4-g32 or gguf:q4_k."""
        if self.kind == "gguf":
            return self.format
        if self.kind == "int":
            rows = f"x{self.block_rows}" if self.block_rows > 1 else ""
            minimum = "-m32" if self.minimum_dtype == "fp32" else ""
            return f"{self.format}-g{self.block_size}{rows}{minimum}"
        dq = f"-dq{self.dq_bits}/{self.dq_dtype}/{self.dq_block_size}" if self.double_quant else ""
        style = "-bnb" if self.dq_style == "bnb" else ""
        return f"{self.format}-b{self.block_size}{dq}{style}"

    def to_dict(self) -> dict:
        """The fields; dq_style only where it is not the default, so default configs are recorded (and read
        by older qbara) exactly as before the field existed."""
        data = dataclasses.asdict(self)
        if data["dq_style"] == "qbara":
            del data["dq_style"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return strict_from_dict(cls, data)

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Raise a QbaraError naming `name` if this config cannot quantize a weight of `shape`."""
        if self.kind == "gguf":
            return check_ggml_shape(tuple(shape), self.ggml, name, prefix=GGUF_PREFIX)
        if len(shape) != 2:
            raise QbaraError(f"{name}: only 2-D weights can be quantized, got shape {tuple(shape)}")
        d_out, d_in = shape
        if d_in % self.block_size:
            divisors = [b for b in (16, 32, 64, 128, 256) if d_in % b == 0]
            raise QbaraError(
                f"{name}: block_size {self.block_size} does not divide its {d_in} input features; "
                f"use a block_size that divides {d_in} (e.g. {divisors or [1]}) or leave this layer out")
        if d_out % self.block_rows:
            raise QbaraError(f"{name}: block_rows {self.block_rows} does not divide its {d_out} output "
                             f"features; choose block_rows dividing {d_out}")
