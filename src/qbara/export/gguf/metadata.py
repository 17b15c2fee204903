"""The model's metadata: `<arch>.*` hyper-parameters, general.file_type, and the `tokenizer.*` fields."""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType, LlamaFileType

from qbara.export.gguf.architectures import (
    Architecture,
    arch_hparams,
    context_length,
    head_dim,
    rope_theta,
    rotary_dims,
)
from qbara.export.tokenizer import (
    TokenizerFields,
    fields_from_gguf,
    fields_from_hf,
    shipped_smollm2_reader,
)
from qbara.validate import gguf_reader

# GGML type of the linear layers -> general.file_type (LlamaFileType member), as llama-model-loader.cpp names a
# file without one (Q3_K/Q4_K/Q5_K -> the _M mixes). llama.cpp only prints it.
_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
              "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "IQ4_NL": "MOSTLY_IQ4_NL", "IQ4_XS": "MOSTLY_IQ4_XS",
              "IQ3_S": "MOSTLY_IQ3_S", "IQ3_XXS": "MOSTLY_IQ3_XXS",
              "F32": "ALL_F32", "F16": "MOSTLY_F16"}


def file_type(linear_params: dict[str, int]) -> int:
    """general.file_type for linears of these GGML types (name -> parameters): the type holding most parameters."""
    dominant = max(linear_params, key=lambda k: (linear_params[k], k)) if linear_params else "Q4_1"
    return int(LlamaFileType[_FILE_TYPES.get(dominant, "MOSTLY_Q4_1")])


def write_hparams(writer, arch: Architecture, config, block_count: int, vocab_size: int, ftype: int) -> None:
    """The `<arch>.*` hyper-parameters llama.cpp reads, and general.file_type."""
    prefix = arch.gguf_arch
    n_head = int(config.num_attention_heads)
    dim = head_dim(config)
    writer.add_uint32(f"{prefix}.context_length", context_length(arch, config))
    writer.add_uint32(f"{prefix}.embedding_length", int(config.hidden_size))
    writer.add_uint32(f"{prefix}.block_count", block_count)
    writer.add_uint32(f"{prefix}.feed_forward_length", int(config.intermediate_size))
    writer.add_uint32(f"{prefix}.attention.head_count", n_head)
    writer.add_uint32(f"{prefix}.attention.head_count_kv", int(config.num_key_value_heads))
    if arch.key_length_always or dim != config.hidden_size // n_head:
        writer.add_uint32(f"{prefix}.attention.key_length", dim)
        writer.add_uint32(f"{prefix}.attention.value_length", dim)
    writer.add_float32(f"{prefix}.rope.freq_base", rope_theta(config, arch.rope_layer_type))
    writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
    writer.add_uint32("general.file_type", ftype)
    writer.add_uint32(f"{prefix}.vocab_size", vocab_size)
    writer.add_uint32(f"{prefix}.rope.dimension_count", rotary_dims(config))
    adders = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string}
    for key, value, kind in arch_hparams(arch, config):
        adders[kind](f"{prefix}.{key}", value)


def source_gguf(tokenizer, tokenizer_gguf):
    """(path, reader) of the GGUF to copy tokenizer metadata from (`tokenizer_gguf`, or the shipped SmolLM2 file
    for SmolLM2's tokenizer); None to build it from the tokenizer."""
    if tokenizer_gguf is not None:
        return Path(tokenizer_gguf), gguf_reader(tokenizer_gguf)
    return shipped_smollm2_reader(tokenizer)


def tokenizer_fields(tokenizer, vocab_size: int, source) -> TokenizerFields:
    """The `tokenizer.*` fields, copied from `source` or built from the tokenizer; the chat template is the
    tokenizer's when it has one (e.g. the adapter's recorded one)."""
    if source is None:
        return fields_from_hf(tokenizer, vocab_size)
    fields = fields_from_gguf(*source)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.add("tokenizer.chat_template", template, GGUFValueType.STRING)
    return fields
