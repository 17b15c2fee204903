"""The tensors of the base GGUF, in llama.cpp names and file order: token_embd, each block's norms and
linears, output_norm, output. Each is (name, array, raw GGMLQuantizationType or None for F32/F16)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from qbara.errors import QbaraError
from qbara.export.blocks import dequantize_q8_0, pack_q8_0, quantize_q8_0
from qbara.export.gguf.linears import (
    LINEARS,
    NORMS,
    Linear,
    linear_bytes,
    requantize,
    rope_heads,
)

EMBEDDING_TYPES = ("q8_0", "f16", "f32")


@dataclass
class LinearStats:
    """How the linear layers went out: exact (INT4 / INT5 G32 as Q4_1 / Q5_1, or gguf:* blocks) or re-quantized."""

    exact_q4_1: list[str] = field(default_factory=list)
    exact_q5_1: list[str] = field(default_factory=list)
    exact_ggml: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)
    err_num: float = 0.0
    err_den: float = 0.0
    max_layer_error: float = 0.0
    types: dict[str, str] = field(default_factory=dict)   # HF name -> GGML type name

    def add_requantized(self, name: str, diff: float, ref: float) -> None:
        self.requantized.append(name)
        self.err_num, self.err_den = self.err_num + diff, self.err_den + ref
        self.max_layer_error = max(self.max_layer_error, (diff / ref) ** 0.5 if ref > 0 else 0.0)

    @property
    def requantize_error(self) -> float:
        return (self.err_num / self.err_den) ** 0.5 if self.err_den > 0 else 0.0


# ---------------------------------------------------------------------------------------- floats
def float_tensor(name: str, weight: Tensor, kind: str) -> tuple[np.ndarray, object, float]:
    """(array, raw GGML type or None, relative error) for a float matrix written as `kind`."""
    from gguf import GGMLQuantizationType

    w = weight.detach().to("cpu", torch.float32)
    if kind == "q8_0":
        if w.shape[-1] % 32:
            raise QbaraError(f"{name}: Q8_0 needs a row length divisible by 32 (got {w.shape[-1]}); "
                             f"use embedding_type='f16' or 'f32'")
        codes, d = quantize_q8_0(w)
        err = rel_error(w, dequantize_q8_0(codes, d))
        return pack_q8_0(codes, d), GGMLQuantizationType.Q8_0, err
    if kind == "f16":
        arr = w.to(torch.float16)
        return arr.numpy(), None, rel_error(w, arr.float())
    return w.contiguous().numpy(), None, 0.0


def rel_error(reference: Tensor, approx: Tensor) -> float:
    norm = float(reference.norm())
    return float((reference - approx).norm()) / norm if norm > 0 else 0.0


def _f32(weight: Tensor) -> np.ndarray:
    return weight.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------- tensors
def linear_tensor(name: str, gguf_name: str, item: Linear, config, stats: LinearStats) -> tuple:
    """One linear layer's tensor: its own codes or blocks, or (lossy) re-quantized first."""
    if item.qtensor is None:
        stats.add_requantized(item.name, *requantize(item))
    elif item.qtensor.config.kind == "gguf":
        stats.exact_ggml.append(item.name)
    else:
        (stats.exact_q5_1 if item.qtensor.config.format == "int5" else stats.exact_q4_1).append(item.name)
    data, raw = linear_bytes(item, rope_heads(gguf_name, config))
    stats.types[item.name] = raw.name
    return name, data, raw


def block_tensors(i: int, layer: nn.Module, row: list[Linear], config, stats: LinearStats) -> list[tuple]:
    """Decoder block i: attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down (llama.cpp's order)."""
    prefix = f"blk.{i}"
    norms = {gguf_name: layer.get_submodule(sub).weight for sub, gguf_name in NORMS}
    out = [(f"{prefix}.attn_norm.weight", _f32(norms["attn_norm"]), None)]
    for (_, gguf_name), item in zip(LINEARS, row):
        if gguf_name == "ffn_gate":
            out.append((f"{prefix}.ffn_norm.weight", _f32(norms["ffn_norm"]), None))
        out.append(linear_tensor(f"{prefix}.{gguf_name}.weight", gguf_name, item, config, stats))
    return out


def is_tied(model: nn.Module) -> bool:
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    return output is None or output.weight is embed or output.weight.data_ptr() == embed.data_ptr()


def output_tensors(model: nn.Module, embedding_type: str) -> tuple[list[tuple], float]:
    """output_norm, and output (the lm_head) unless tied to token_embd; the lm_head's relative error."""
    out = [("output_norm.weight", _f32(model.model.norm.weight), None)]
    if is_tied(model):
        return out, 0.0
    output = model.get_output_embeddings()
    if getattr(output, "bias", None) is not None:
        raise QbaraError("the output layer (lm_head) has a bias, which llama.cpp's llama does not read")
    arr, raw, err = float_tensor("output.weight", output.weight, embedding_type)
    out.append(("output.weight", arr, raw))
    return out, err


def type_name(data: np.ndarray, raw) -> str:
    """The GGML type name of a tensor as written."""
    return raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")


def param_count(data: np.ndarray, raw) -> int:
    """Weights a tensor holds (a raw block tensor counts its blocks' weights)."""
    if raw is None:
        return int(data.size)
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[raw]
    return int(data.size) // size * block
