"""The tensors of the base GGUF, in llama.cpp names and file order: token_embd, each block's tensors (the
architecture's table entry: norms, linears, biases), output_norm, output, then any extra tensor of the
architecture (rope_freqs). Each is (name, array, raw GGMLQuantizationType or None for F32/F16)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from torch import Tensor, nn

from qbara.errors import QbaraError
from qbara.export.gguf.architectures import Architecture
from qbara.export.gguf.linears import (
    Linear,
    dense_array,
    linear_bytes,
    requantize,
    row_order,
)
from qbara.quant.ggml import GGML_FORMATS, dequantize_ggml, quantize_ggml

# token embedding / output types: Q8_0 (the default), floats, or any other GGML block format (a llama.cpp preset's)
EMBEDDING_TYPES = ("q8_0", "f16", "f32", *(k for k in GGML_FORMATS if k != "q8_0"))


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
    dense: list[str] = field(default_factory=list)          # written unquantized (dense_type)
    dense_num: float = 0.0
    dense_den: float = 0.0

    @property
    def dense_error(self) -> float:
        """Relative error of the dense layers' float type (0.0 for F32)."""
        return (self.dense_num / self.dense_den) ** 0.5 if self.dense_den > 0 else 0.0

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
    w = weight.detach().to("cpu", torch.float32)
    if kind in GGML_FORMATS:  # unweighted: llama.cpp's importance matrix has no entry for the embedding
        fmt = GGML_FORMATS[kind]
        if w.shape[-1] % fmt.block_size:
            raise QbaraError(f"{name}: {kind.upper()} needs a row length divisible by {fmt.block_size} (got "
                             f"{w.shape[-1]}); use embedding_type='q8_0' (rows of 32), 'f16' or 'f32'")
        raw = quantize_ggml(w, fmt, name)
        return raw.numpy(), fmt.ggml_type, _rel_error(w, dequantize_ggml(raw, tuple(w.shape), fmt))
    if kind == "f16":
        arr = w.to(torch.float16)
        return arr.numpy(), None, _rel_error(w, arr.float())
    return w.contiguous().numpy(), None, 0.0


def _rel_error(reference: Tensor, approx: Tensor) -> float:
    norm = float(reference.norm())
    return float((reference - approx).norm()) / norm if norm > 0 else 0.0


# ---------------------------------------------------------------------------------------- tensors
def _linear_tensor(name: str, gguf_name: str, item: Linear, arch: Architecture, config, stats: LinearStats,
                  dense_type: str | None = None) -> tuple:
    """One linear layer's tensor: its own codes or blocks, a float matrix (`dense_type`), or (lossy)
    re-quantized first."""
    heads = arch.rope_heads(gguf_name, config)
    if item.qtensor is None and dense_type is not None:
        data = dense_array(item, heads, dense_type)
        diff = float((item.dense - torch.from_numpy(data.astype(np.float32))[_inverse(item, heads)]).norm()) ** 2
        stats.dense.append(item.name)
        stats.dense_num, stats.dense_den = stats.dense_num + diff, stats.dense_den + float(item.dense.norm()) ** 2
        stats.types[item.name] = dense_type.upper()
        return name, data, None
    if item.qtensor is None:
        stats.add_requantized(item.name, *requantize(item))
    elif item.qtensor.config.family.stores_gguf_blocks:
        stats.exact_ggml.append(item.name)
    else:  # an INT layer packed as its GGUF type
        config = item.qtensor.config
        gguf_type = config.family.gguf_format(config)
        (stats.exact_q5_1 if gguf_type is not None and gguf_type.name == "q5_1" else stats.exact_q4_1).append(item.name)
    data, raw = linear_bytes(item, heads)
    stats.types[item.name] = raw.name
    return name, data, raw


def _inverse(item: Linear, heads: int | None):
    """Index putting the file's rows back in HF order."""
    perm = row_order(item.dense.shape[0], heads)
    return slice(None) if perm is None else torch.argsort(perm)


def _norm_array(weight: Tensor, offset: float) -> np.ndarray:
    """A norm weight as F32, plus the architecture's offset (Gemma: the converter writes 1 + w)."""
    w = weight.detach().float().cpu()
    return (w + offset).numpy() if offset else w.numpy()


def block_tensors(i: int, layer: nn.Module, row: list[Linear], arch: Architecture, config, stats: LinearStats,
                  dense_type: str | None = None) -> list[tuple]:
    """Decoder block i in the table entry's order: norms (F32), linears and their biases (F32)."""
    prefix = f"blk.{i}"
    items = iter(row)
    out = []
    for slot in arch.block:
        if not slot.linear:
            out.append((f"{prefix}.{slot.gguf}.weight", _norm_array(layer.get_submodule(slot.hf).weight,
                                                                  arch.norm_offset), None))
            continue
        item = next(items)
        out.append(_linear_tensor(f"{prefix}.{slot.gguf}.weight", slot.gguf, item, arch, config, stats, dense_type))
        if item.bias is not None:
            perm = row_order(item.bias.shape[0], arch.rope_heads(slot.gguf, config))
            bias = item.bias if perm is None else item.bias[perm]
            out.append((f"{prefix}.{slot.gguf}.bias", bias.contiguous().numpy(), None))
    return out


def _is_tied(model: nn.Module) -> bool:
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    return output is None or output.weight is embed or output.weight.data_ptr() == embed.data_ptr()


def output_tensors(model: nn.Module, output_type: str, arch: Architecture) -> tuple[list[tuple], float]:
    """output_norm, and output (the lm_head, as `output_type`) unless tied to token_embd; the lm_head's relative
    error."""
    out = [("output_norm.weight", _norm_array(model.model.norm.weight, arch.norm_offset), None)]
    if _is_tied(model):
        return out, 0.0
    if not arch.untied_output:
        raise QbaraError(f"this model's lm_head is not tied to its token embedding; {arch.gguf_arch} GGUFs hold "
                         f"no output tensor (llama.cpp's converter writes the tied embedding only), so the export "
                         f"would lose the lm_head: tie them (tie_word_embeddings) or use export_hf")
    output = model.get_output_embeddings()
    if getattr(output, "bias", None) is not None:
        raise QbaraError(f"the output layer (lm_head) has a bias, which llama.cpp's {arch.gguf_arch} does not read")
    arr, raw, err = float_tensor("output.weight", output.weight, output_type)
    out.append(("output.weight", arr, raw))
    return out, err


def type_name(data: np.ndarray, raw) -> str:
    """The GGML type name of a tensor as written."""
    return raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")


def param_count(data: np.ndarray, raw) -> int:
    """Weights a tensor holds (a raw block tensor counts its blocks' weights)."""
    if raw is None:
        return int(data.size)
    block, size = GGML_QUANT_SIZES[raw]
    return int(data.size) // size * block
