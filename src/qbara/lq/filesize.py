"""File-size budgets for LQ-LoRA's allocation: Σ_i bits(config_i) · numel_i + fixed_bits <= budget · total_params.
fixed_bits: the token embedding (Q8_0 by default, as `export_gguf` writes it), an untied output head, every other
parameter (F32), optionally the factors as a GGUF adapter and metadata; tied weights count once, the adapter's
factors are bits, not parameters; GGUF alignment padding is not counted."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.ggml import GGML_FORMATS, check_ggml_shape
from qbara.targets import linear_layer_names

__all__ = ["FileBudget", "tensor_bits"]

_FLOAT_BITS = {"f32": 32, "f16": 16, "bf16": 16}
_ADAPTER_FORMATS = ("f32", "f16")  # what export_gguf_lora writes (its dtype=)


def tensor_bits(fmt: str, shape: tuple[int, ...], what: str = "tensor") -> float:
    """Bits a GGUF file spends on a `shape` tensor stored as `fmt` (f32/f16/bf16 or a GGML block format, with or
    without "gguf:"; its block must divide the row length)."""
    name = str(fmt).lower().removeprefix("gguf:")
    shape = tuple(int(d) for d in shape) or (1,)
    numel = math.prod(shape)
    if name in _FLOAT_BITS:
        return float(_FLOAT_BITS[name] * numel)
    if name not in GGML_FORMATS:
        raise QbaraError(f"{what}: unknown GGUF tensor type {fmt!r}; choose one of "
                         f"{', '.join(list(_FLOAT_BITS) + list(GGML_FORMATS))}")
    ggml = GGML_FORMATS[name]
    check_ggml_shape((numel // max(shape[-1], 1), shape[-1]), ggml, what)  # GGML blocks run along the last dim
    return ggml.bits_per_param * numel


@dataclass(frozen=True)
class FileBudget:
    """The part of a file the allocation does not choose: `fixed_bits`, out of `total_params` parameters of
    which `matrix_params` are the allocated matrices. `parts`: label -> bits, for reports."""

    fixed_bits: float
    total_params: int
    matrix_params: int
    parts: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (self.fixed_bits >= 0) or self.matrix_params <= 0 or self.total_params < self.matrix_params:
            raise QbaraError(f"inconsistent FileBudget (fixed_bits={self.fixed_bits}, total_params="
                             f"{self.total_params}, matrix_params={self.matrix_params}); build it with "
                             f"FileBudget.of_model")

    def file_bits_per_param(self, matrix_bits_per_param: float) -> float:
        """File bits/param when the allocated matrices take `matrix_bits_per_param`."""
        return (matrix_bits_per_param * self.matrix_params + self.fixed_bits) / self.total_params

    def file_bytes(self, matrix_bits_per_param: float) -> float:
        """File size in bytes (tensor data and `metadata_bytes`; no alignment padding)."""
        return (matrix_bits_per_param * self.matrix_params + self.fixed_bits) / 8

    def to_dict(self) -> dict:
        return {"fixed_bits": self.fixed_bits, "total_params": self.total_params,
                "matrix_params": self.matrix_params, "parts": dict(self.parts)}

    @classmethod
    def of_model(cls, model: nn.Module, targets="all-linear", *, embedding_format: str = "q8_0",
                 output_format: str | None = None, other_format: str = "f32", adapter_format: str | None = None,
                 rank: int | None = None, metadata_bytes: int = 0,
                 extra_shapes: Mapping[str, tuple[int, ...]] | None = None) -> "FileBudget":
        """The file budget of a (dense or meta-device) model whose `targets` linears the ILP allocates.

        output_format: an untied head's (default: the embedding's). other_format: norms, biases, linears outside
        `targets`. adapter_format: "f32" or "f16" counts rank-`rank` factors exported by `export_gguf_lora`.
        extra_shapes: name -> shape of tensors the file holds that are no parameter (LLaMA-3's rope_freqs), in
        other_format."""
        names = linear_layer_names(model, targets, include_quantized=False)
        matrices = {id(model.get_submodule(n).weight): n for n in names}
        embed = _weight(model, "get_input_embeddings")
        output = _weight(model, "get_output_embeddings")
        fmt = {id(embed): ("token_embd", embedding_format)} if embed is not None else {}
        if output is not None and output is not embed:
            fmt[id(output)] = ("output", output_format or embedding_format)
        parts: dict[str, float] = {}
        total = matrix = 0
        for pname, p in model.named_parameters():  # each shared (tied) parameter once
            total += p.numel()
            if id(p) in matrices:
                matrix += p.numel()
                continue
            label, kind = fmt.get(id(p), ("other", other_format))
            _add(parts, f"{label} ({kind})", tensor_bits(kind, tuple(p.shape), pname))
        for module in model.modules():  # already-quantized linears: their stored size
            if isinstance(module, QuantizedLinear):
                total += module.out_features * module.in_features
                _add(parts, "quantized linears (as stored)", 8.0 * module.nbytes)
        for name, shape in (extra_shapes or {}).items():
            total += math.prod(shape)
            _add(parts, f"{name} ({other_format})", tensor_bits(other_format, tuple(shape), name))
        if adapter_format is not None:
            _add(parts, f"adapter factors ({adapter_format})", _adapter_bits(model, names, adapter_format, rank))
        if metadata_bytes:
            _add(parts, "metadata", 8.0 * _non_negative_int(metadata_bytes, "metadata_bytes"))
        return cls(float(sum(parts.values())), int(total), int(matrix), parts)


def _weight(model: nn.Module, getter: str):
    module = getattr(model, getter, lambda: None)()
    return getattr(module, "weight", None) if module is not None else None


def _add(parts: dict, label: str, bits: float) -> None:
    parts[label] = parts.get(label, 0.0) + float(bits)


def _non_negative_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QbaraError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _adapter_bits(model: nn.Module, names, adapter_format: str, rank) -> float:
    """Bits of the factors A (rank x d_in) and B (d_out x rank) of every target, as F16 or F32."""
    if adapter_format not in _ADAPTER_FORMATS:
        raise QbaraError(f"adapter_format must be one of {', '.join(_ADAPTER_FORMATS)} (the GGUF LoRA adapter tensors "
                         f"export_gguf_lora writes), "
                         f"got {adapter_format!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise QbaraError(f"counting the adapter needs its rank: pass rank=<LoRA rank>, got {rank!r}")
    values = sum(rank * sum(model.get_submodule(n).weight.shape) for n in names)
    return float(_FLOAT_BITS[adapter_format] * values)
