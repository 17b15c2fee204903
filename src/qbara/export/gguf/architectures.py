"""One table entry per architecture GGUF export supports: what llama.cpp's converter writes for it (tensor names
in file order, rotary row order, norm offset, activation, rotary scalings, own hyper-parameters and refusals),
consumed by the generic writer (`metadata`, `tensors`, `linears`, `lora`). A new architecture is one entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import nn

from qbara.errors import QbaraError


@dataclass(frozen=True)
class _Slot:
    """One tensor of a decoder block: HF submodule -> llama.cpp name (without "blk.N." and ".weight")."""

    hf: str
    gguf: str
    linear: bool = True
    bias: bool = False   # its bias is written (as <name>.bias, F32); a bias elsewhere is refused


def _lin(hf: str, gguf: str, bias: bool = False) -> _Slot:
    return _Slot(hf, gguf, True, bias)


def _norm(hf: str, gguf: str) -> _Slot:
    return _Slot(hf, gguf, False)


@dataclass(frozen=True)
class Architecture:
    """What llama.cpp's converter writes for one Hugging Face architecture."""

    gguf_arch: str                       # general.architecture (the `<arch>.*` key prefix)
    model_types: tuple[str, ...]         # HF config.model_type values it covers
    block: tuple[_Slot, ...]             # a decoder block's tensors, in file order
    rope_permuted: bool = False          # q/k rows in llama.cpp's interleaved rotary order
    norm_offset: float = 0.0             # added to every norm weight (RMSNorm scaling by 1 + w in HF)
    untied_output: bool = True           # an untied lm_head is written as output.weight
    activation: tuple[str, ...] = ("silu",)   # config.hidden_act / hidden_activation llama.cpp's graph applies
    rope_types: tuple[str, ...] = ("default",)  # rotary scalings written (others are refused)
    extra: Callable | None = None        # config -> (extra hparams [(key, value, kind)], problems [str])
    tensors: Callable | None = None      # config -> [(name, float32 array)] outside the blocks (rope factors)
    rope_layer_type: str | None = None   # the layer type whose rotary rope.freq_base / scaling describe
    key_length_always: bool = False      # attention.key_length / value_length even when = hidden / heads
    # llama.cpp runs it with full attention though HF slides a window (Mistral, Phi-3): context_length is capped
    # at the window, within which both attend alike, so the file does not claim a context it would run otherwise.
    window_caps_context: bool = False

    @property
    def linears(self) -> tuple[_Slot, ...]:
        return tuple(s for s in self.block if s.linear)

    @property
    def norms(self) -> tuple[_Slot, ...]:
        return tuple(s for s in self.block if not s.linear)

    def rope_heads(self, gguf_name: str, config) -> int | None:
        """Heads whose rotary layout a tensor's rows are reordered into (attn_q / attn_k of a permuted
        architecture), else None."""
        if not self.rope_permuted:
            return None
        if gguf_name == "attn_q":
            return int(config.num_attention_heads)
        if gguf_name == "attn_k":
            return int(config.num_key_value_heads)
        return None


# ---------------------------------------------------------------------------------------- config readers
def head_dim(config) -> int:
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def _rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rotary parameters (rope_type, rope_theta, factor, ...) of `config`, or of its `layer_type` layers
    when they differ per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {"rope_type": "default"}
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    out = dict(rope)
    out["rope_type"] = out.get("rope_type", out.get("type", "default")) or "default"
    if "rope_theta" not in out and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = float(config.rope_theta)
    return out


def rotary_dims(config) -> int:
    """Dimensions of each head the rotary turns (head_dim, times a partial_rotary_factor)."""
    factor = _rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(float(factor) * head_dim(config)) if factor else head_dim(config)


def context_length(arch: Architecture, config) -> int:
    """llama.cpp's training context: max_position_embeddings, capped at the sliding window where llama.cpp
    attends to the whole context instead (`Architecture.window_caps_context`)."""
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None) if arch.window_caps_context else None
    return min(context, int(window)) if window else context


def rope_theta(config, layer_type: str | None = None) -> float:
    return float(_rope_parameters(config, layer_type).get("rope_theta", 10000.0))


def _llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's `rope_freqs` for LLaMA-3 rotary scaling: per frequency pair the factor its angle is divided
    by (1 for high frequencies, `factor` for low ones, smoothly in between), float32 of length head_dim / 2."""
    rope = _rope_parameters(config)
    dim, base = head_dim(config), rope_theta(config)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------- per architecture
def _llama_extra(config):
    """LLaMA / Mistral: linear rotary scaling as rope.scaling.*; LLaMA-3 scaling as the rope_freqs tensor
    (`_llama3_rope_factors`, written by `extra_tensors`)."""
    rope = _rope_parameters(config)
    if rope["rope_type"] == "linear":
        return [("rope.scaling.type", "linear", "str"), ("rope.scaling.factor", float(rope["factor"]), "f32")], []
    return [], []


def _llama_tensors(config) -> list[tuple[str, np.ndarray]]:
    """LLaMA-3 rotary scaling: the rope_freqs tensor llama.cpp divides each frequency by."""
    if _rope_parameters(config)["rope_type"] == "llama3":
        return [("rope_freqs.weight", _llama3_rope_factors(config))]
    return []


def _no_sliding_window(config, flag: str | None = None) -> list[str]:
    if flag is not None and getattr(config, flag, False):
        return [f"sliding-window attention ({flag}=True; llama.cpp's {config.model_type} attends to the whole "
                f"context)"]
    return []


def _qwen_extra(config):
    return [], _no_sliding_window(config, "use_sliding_window")


def _phi3_extra(config):
    """Phi-3: the original context (rope.scaling.original_context_length) and the sliding window (0 for none),
    as the converter writes them; LongRoPE's attention factor (its long / short factors are `_phi3_tensors`)."""
    problems, hparams = [], []
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        hparams.append(("rope.scaling.original_context_length", int(original), "u32"))
    hparams.append(("attention.sliding_window", int(getattr(config, "sliding_window", None) or 0), "u32"))
    rope = _rope_parameters(config)
    if rope["rope_type"] == "longrope":
        original = int(rope.get("original_max_position_embeddings", original or config.max_position_embeddings))
        hparams.append(("rope.scaling.attn_factor", _longrope_attention_factor(config, original), "f32"))
        pairs = rotary_dims(config) // 2
        if len(rope.get("long_factor") or []) != pairs or len(rope.get("short_factor") or []) != pairs:
            problems.append(f"LongRoPE factors of {len(rope.get('long_factor') or [])} / "
                            f"{len(rope.get('short_factor') or [])} values (llama.cpp needs {pairs}, one per pair)")
    return hparams, problems


def _longrope_attention_factor(config, original: int) -> float:
    """LongRoPE's attention scaling: the config's attention_factor, else sqrt(1 + ln(s) / ln(original context))
    for the extension s = max_position_embeddings / original context (1 when not extended)."""
    rope = _rope_parameters(config)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = float(rope.get("factor") or config.max_position_embeddings / original)
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def _phi3_tensors(config) -> list[tuple[str, np.ndarray]]:
    """LongRoPE: rope_factors_long / rope_factors_short (F32, one per frequency pair); llama.cpp uses the long
    ones when its context exceeds the original one."""
    rope = _rope_parameters(config)
    if rope["rope_type"] != "longrope":
        return []
    return [("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))]


def _gemma3_extra(config):
    """Gemma 3: the sliding window, and linear scaling of the global layers' rotary. llama.cpp fixes the rest:
    every 6th layer global (the others sliding), rotary base 10000 on sliding layers, and the attention scale
    1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 62-layer 27B): a config that differs is refused."""
    problems = []
    layers = int(config.num_hidden_layers)
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    layer_types = list(getattr(config, "layer_types", None) or pattern)
    if layer_types != pattern:
        problems.append(f"layer_types {layer_types} (llama.cpp's gemma3 makes every 6th layer global: {pattern})")
    local = _rope_parameters(config, "sliding_attention")
    if local["rope_type"] != "default" or rope_theta(config, "sliding_attention") != 10000.0:
        problems.append(f"sliding layers' rotary {local} (llama.cpp's gemma3 uses base 10000, unscaled)")
    scale_dim = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim(config)
    if float(getattr(config, "query_pre_attn_scalar", scale_dim)) != float(scale_dim):
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp's gemma3 scales "
                        f"attention by 1/sqrt({scale_dim}))")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None):
            problems.append(f"{key} {getattr(config, key)}")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    hparams = [("attention.sliding_window", int(config.sliding_window), "u32")]
    rope = _rope_parameters(config, "full_attention")
    if rope["rope_type"] == "linear":
        hparams += [("rope.scaling.type", "linear", "str"), ("rope.scaling.factor", float(rope["factor"]), "f32")]
    return hparams, problems


_LLAMA_BLOCK = (
    _norm("input_layernorm", "attn_norm"),
    _lin("self_attn.q_proj", "attn_q"),
    _lin("self_attn.k_proj", "attn_k"),
    _lin("self_attn.v_proj", "attn_v"),
    _lin("self_attn.o_proj", "attn_output"),
    _norm("post_attention_layernorm", "ffn_norm"),
    _lin("mlp.gate_proj", "ffn_gate"),
    _lin("mlp.up_proj", "ffn_up"),
    _lin("mlp.down_proj", "ffn_down"),
)

_GATED_MLP = _LLAMA_BLOCK[-3:]
# Qwen3 / Gemma 3: q and k each RMS-normed before the rotary
_QK_NORM_ATTENTION = (
    _norm("input_layernorm", "attn_norm"),
    _lin("self_attn.q_proj", "attn_q"),
    _norm("self_attn.q_norm", "attn_q_norm"),
    _lin("self_attn.k_proj", "attn_k"),
    _norm("self_attn.k_norm", "attn_k_norm"),
    _lin("self_attn.v_proj", "attn_v"),
    _lin("self_attn.o_proj", "attn_output"),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", ("llama",), _LLAMA_BLOCK, rope_permuted=True,
                          rope_types=("default", "linear", "llama3"), extra=_llama_extra, tensors=_llama_tensors),
    # llama.cpp runs Mistral as `llama` (its converter writes it so); transformers reads it back as LLaMA.
    "mistral": Architecture("llama", ("mistral",), _LLAMA_BLOCK, rope_permuted=True,
                            rope_types=("default", "linear", "llama3"), extra=_llama_extra, tensors=_llama_tensors,
                            window_caps_context=True),
    "qwen2": Architecture("qwen2", ("qwen2",), (
        _norm("input_layernorm", "attn_norm"),
        _lin("self_attn.q_proj", "attn_q", bias=True),
        _lin("self_attn.k_proj", "attn_k", bias=True),
        _lin("self_attn.v_proj", "attn_v", bias=True),
        _lin("self_attn.o_proj", "attn_output"),
        _norm("post_attention_layernorm", "ffn_norm"),
        _lin("mlp.gate_proj", "ffn_gate"),
        _lin("mlp.up_proj", "ffn_up"),
        _lin("mlp.down_proj", "ffn_down"),
    ), extra=_qwen_extra),
    "qwen3": Architecture("qwen3", ("qwen3",), (
        *_QK_NORM_ATTENTION,
        _norm("post_attention_layernorm", "ffn_norm"),
        *_GATED_MLP,
    ), extra=_qwen_extra, key_length_always=True),
    "gemma3": Architecture("gemma3", ("gemma3_text",), (
        *_QK_NORM_ATTENTION,
        _norm("post_attention_layernorm", "post_attention_norm"),
        _norm("pre_feedforward_layernorm", "ffn_norm"),
        *_GATED_MLP,
        _norm("post_feedforward_layernorm", "post_ffw_norm"),
    ), norm_offset=1.0, untied_output=False, activation=("gelu_pytorch_tanh",), rope_types=("default", "linear"),
        extra=_gemma3_extra, key_length_always=True, rope_layer_type="full_attention"),
    # Phi-3 keeps its fused projections: attn_qkv holds q, k, v rows; ffn_up holds gate then up rows (llama.cpp
    # splits them in half for its SwiGLU). Whole rows, so INT4 / INT5 G32 blocks stay intact.
    "phi3": Architecture("phi3", ("phi3",), (
        _norm("input_layernorm", "attn_norm"),
        _lin("self_attn.qkv_proj", "attn_qkv"),
        _lin("self_attn.o_proj", "attn_output"),
        _norm("post_attention_layernorm", "ffn_norm"),
        _lin("mlp.gate_up_proj", "ffn_up"),
        _lin("mlp.down_proj", "ffn_down"),
    ), rope_types=("default", "longrope"), extra=_phi3_extra, tensors=_phi3_tensors, window_caps_context=True),
}


def _supported() -> str:
    return ", ".join(sorted({t for a in ARCHITECTURES.values() for t in a.model_types}))


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry of `model`'s architecture; a QbaraError naming the supported ones (or what the model has
    that llama.cpp would not reproduce) otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    if arch is None or not hasattr(getattr(model, "model", None), "layers"):
        raise QbaraError(f"GGUF export supports the architectures {_supported()} (LLaMA-architecture models such as "
                         f"SmolLM2 included); this model is {model_type or type(model).__name__!r}. Use export_hf "
                         f"(qbara export --format hf) for other architectures")
    problems = list(_common_problems(arch, config))
    if arch.extra is not None:
        problems += arch.extra(config)[1]
    if problems:
        raise QbaraError(f"GGUF export of this {model_type} model would not run the same in llama.cpp: it has "
                         f"{'; '.join(problems)}, which llama.cpp's {arch.gguf_arch} does not reproduce. Use "
                         f"export_hf (qbara export --format hf) instead")
    return arch


def _common_problems(arch: Architecture, config):
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", arch.activation[0])
    if act not in arch.activation:
        yield f"activation {act!r} (llama.cpp's {arch.gguf_arch} uses {arch.activation[0]})"
    if getattr(config, "mlp_bias", False) or (getattr(config, "attention_bias", False)
                                              and not any(s.bias for s in arch.linears)):
        yield "linear biases (attention_bias / mlp_bias)"
    rope_type = _rope_parameters(config, arch.rope_layer_type)["rope_type"]
    if rope_type not in arch.rope_types:
        yield f"rope scaling {rope_type!r} (written for {arch.gguf_arch}: {', '.join(arch.rope_types)})"


def arch_hparams(arch: Architecture, config) -> list[tuple[str, object, str]]:
    """The architecture's own hyper-parameters (key without the arch prefix, value, "u32" / "f32" / "str")."""
    return arch.extra(config)[0] if arch.extra is not None else []


def extra_tensors(arch: Architecture, config) -> list[tuple[str, np.ndarray]]:
    """Tensors outside the blocks that the converter writes (LLaMA-3's rope_freqs, Phi-3's LongRoPE factors)."""
    return arch.tensors(config) if arch.tensors is not None else []


__all__ = ["ARCHITECTURES"]
