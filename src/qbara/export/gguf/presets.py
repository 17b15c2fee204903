"""llama.cpp's quantization presets (`llama-quantize MODEL OUT Q4_K_M`): the GGML type its quantizer gives each
tensor of a model, and so the size of the file it writes. qbara's own reading of the rules documented in
llama.cpp's src/llama-quant.cpp (`llama_tensor_get_type`): a default type per preset; the tied token embedding (or
the output) as Q6_K, Q8_0 when its rows do not split into the default type's blocks; preset-specific bumps of
attn_v / ffn_down / attn_output by layer position (`_more_bits`); then the fallback of a type whose block does not
divide the row length (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS / IQ3_S -> IQ4_NL, ...). 1-D tensors (norms, biases) stay F32.
Checked against llama.cpp's own files in bench/gguf_presets.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from qbara.errors import QbaraError
from qbara.export.gguf.architectures import extra_tensors
from qbara.export.gguf.checks import check_architecture
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.ggml import GGML_FORMATS

__all__ = ["PRESETS", "PresetFile", "gguf_tensor_shapes", "preset_file", "preset_types"]

# preset -> default type of its quantized tensors
PRESETS = {
    "Q2_K": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_0": "q4_0", "Q4_1": "q4_1",
    "Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K_S": "q4_k", "Q4_K_M": "q4_k", "Q5_K_S": "q5_k", "Q5_K_M": "q5_k",
    "Q6_K": "q6_k", "Q8_0": "q8_0", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "IQ3_S": "iq3_s", "IQ3_M": "iq3_s",
}
# a type whose block does not divide a tensor's row length -> the type llama.cpp uses instead
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl",
             "iq3_s": "iq4_nl"}
_FLOAT_BITS = {"f32": 32, "f16": 16}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in ("attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down"):
        if f"{part}.weight" in name or (part.startswith("ffn") and part in name):
            return part
    return "other"


def _block(kind: str) -> int:
    return GGML_FORMATS[kind].block_size if kind in GGML_FORMATS else 1


def gguf_tensor_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(llama.cpp name, shape as torch holds it) of every tensor `export_gguf` writes for `model` (dense, quantized
    or a meta-device skeleton), in file order."""
    arch = check_architecture(model)
    embed = model.get_input_embeddings().weight
    out = [("token_embd.weight", tuple(embed.shape))]
    for i, layer in enumerate(model.model.layers):
        for slot in arch.block:
            module = layer.get_submodule(slot.hf)
            shape = (module.out_features, module.in_features) if isinstance(module, QuantizedLinear) else \
                tuple(module.weight.shape)
            out.append((f"blk.{i}.{slot.gguf}.weight", tuple(shape)))
            if slot.linear and slot.bias and getattr(module, "bias", None) is not None:
                out.append((f"blk.{i}.{slot.gguf}.bias", tuple(module.bias.shape)))
    out.append(("output_norm.weight", tuple(model.model.norm.weight.shape)))
    head = model.get_output_embeddings()
    tied = head is None or getattr(model.config, "tie_word_embeddings", False) or head.weight is embed
    if not tied:
        out.append(("output.weight", tuple(head.weight.shape)))
    out += [(n, tuple(a.shape)) for n, a in extra_tensors(arch, model.config)]
    return out


def _rule(preset: str, kind: str, category: str, state: dict, n_gqa: int, imatrix: bool) -> str:
    """The preset's type for one quantizable tensor before the shape fallback (`llama_tensor_get_type`'s rules
    for dense, non-Falcon models of the presets in PRESETS)."""
    if category == "output" or (state["tied"] and category == "token_embd"):
        if state["row"] % _block(kind):
            return "q8_0"
        return kind if kind == "q8_0" else "q6_k"
    if category == "token_embd":
        return kind
    if category in ("attn_v", "attn_qkv"):
        i, n = state["attn_v"], state["n_attn_v"]
        state["attn_v"] += 1
        if preset == "Q2_K":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if i < 2 else "q4_k"
        if preset == "Q3_K_L":
            return "q5_k"
        if (preset == "IQ3_S" and n_gqa >= 4) or preset == "IQ3_M":
            return "q4_k"
        if preset in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            return "q5_k"
        if preset in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return "q6_k"
        if preset == "Q4_K_S" and i < 4:
            return "q5_k"
        return kind
    if category == "ffn_down":
        i, n = state["ffn_down"], state["layers"]
        state["ffn_down"] += 1
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if i < n // 16 else "q4_k"
        if preset == "IQ3_M" and i < n // 8:
            return "q4_k"
        if preset == "Q3_K_L":
            return "q5_k"
        if preset == "Q4_K_M":
            return "q6_k" if _more_bits(i, n) else kind
        if preset in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not imatrix:
            return "q5_k"
        if preset == "Q5_K_M" and _more_bits(i, n):
            return "q6_k"
        if preset == "Q4_K_S" and i < n // 8:
            return "q5_k"
        if preset in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            return "q4_1" if preset == "Q4_0" else "q5_1"
        return kind
    if category == "attn_output":
        return {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k", "IQ3_M": "q4_k"}.get(preset, kind)
    return kind


def _fallback(kind: str, row: int) -> str:
    if row % _block(kind) == 0:
        return kind
    kind = _FALLBACK.get(kind, "f16")
    return kind if row % _block(kind) == 0 else "f16"


def preset_types(model: nn.Module, preset: str, imatrix: bool = False) -> dict[str, str]:
    """llama.cpp name -> type ("q4_k", "f32", ...) of every tensor llama.cpp's `preset` writes for `model`
    quantized from an F32 / F16 GGUF; `imatrix`: with an importance matrix (it changes Q4_0 / Q5_0 / IQ4_*)."""
    name = str(preset).upper()
    if name not in PRESETS:
        raise QbaraError(f"unknown llama.cpp preset {preset!r}: choose one of {', '.join(PRESETS)}")
    kind = PRESETS[name]
    shapes = gguf_tensor_shapes(model)
    config = model.config
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    state = {"tied": not any(n == "output.weight" for n, _ in shapes), "attn_v": 0, "ffn_down": 0,
             "n_attn_v": sum(_category(n) in ("attn_v", "attn_qkv") for n, _ in shapes),
             "layers": len(model.model.layers)}
    types = {}
    for tensor, shape in shapes:
        if len(shape) < 2 or not tensor.endswith("weight") or "_norm.weight" in tensor:
            types[tensor] = "f32"
            continue
        state["row"] = shape[-1]
        chosen = _rule(name, kind, _category(tensor), state, heads // kv, imatrix)
        types[tensor] = _fallback(chosen, shape[-1])
    return types


@dataclass(frozen=True)
class PresetFile:
    """The tensors of llama.cpp's `preset` file for a model: their types and `tensor_bytes` (data without
    metadata or alignment padding) over `params` parameters."""

    preset: str
    imatrix: bool
    types: dict
    tensor_bytes: int
    params: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.tensor_bytes / self.params

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.types.values():
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items()))


def preset_file(model: nn.Module, preset: str, imatrix: bool = False) -> PresetFile:
    """`preset_types` with the bytes its tensors take."""
    types = preset_types(model, preset, imatrix)
    shapes = dict(gguf_tensor_shapes(model))
    total = params = 0
    for tensor, kind in types.items():
        numel = math.prod(shapes[tensor])
        params += numel
        if kind in _FLOAT_BITS:
            total += _FLOAT_BITS[kind] * numel // 8
        else:
            fmt = GGML_FORMATS[kind]
            total += numel // fmt.block_size * fmt.type_size
    return PresetFile(str(preset).upper(), imatrix, types, total, params)
