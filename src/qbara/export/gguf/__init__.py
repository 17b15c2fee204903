"""Export a (merged) model as a GGUF file llama.cpp and transformers can load, and plain LoRA adapters as the
LoRA GGUF llama.cpp loads beside it (`--lora`). Architectures: LLaMA (SmolLM2, LLaMA-3 rotary scaling),
Mistral, Qwen2, Qwen3, Gemma 3 (text) and Phi-3, one table entry each (`architectures`).

Linear layers quantized with INT4 or INT5, group 32 (`QuantConfig("int4", 32)`, `QuantConfig("int5", 32)`:
formats QA-LoRA and QA-HiRA merge into exactly) are written as GGUF Q4_1 / Q5_1 by packing qbara's own
codes, fp16 scales and fp16 minima into that block layout; layers quantized with a gguf:* block format
(`QuantConfig("gguf:q4_k")`, ...) are written as their own block bytes. Either way the file holds bit for
bit the weights of the model, and one file may mix formats. The token embedding (and an untied output
matrix) are written as Q8_0 by default, as in the shipped SmolLM2 file; norms as F32.

Anything else (NF4 or other INT layouts, dense layers, adapters that do not fold) can only be written
by re-quantizing: that needs `lossy=True` (CLI: `--allow-requantize`) and the report states the relative
weight error it introduced. Plain LoRA adapters can instead stay separate: `export_gguf(...,
separate_lora=True)` writes their base, `export_gguf_lora` the adapter file.

Sections: `architectures` (the table), `checks` (what is accepted), `metadata` (<arch>.* hyper-parameters,
tokenizer fields), `provenance` (general.*), `linears` (layer resolution, rotary row order, block bytes), `tensors` (the
file's tensors), `report`, `base` (the writer), `lora` (the adapter file).
"""
from qbara.export.gguf.architectures import ARCHITECTURES, Architecture, architecture_of
from qbara.export.gguf.base import export_gguf, resolve_linears, write_gguf
from qbara.export.gguf.checks import ARCH, check_architecture, check_llama
from qbara.export.gguf.linears import (
    DENSE_TYPES,
    FIX_HINT,
    LINEARS,
    NORMS,
    Q4_1_CONFIG,
    Q5_1_CONFIG,
    is_plain_lora,
    llama_rope_permutation,
)
from qbara.export.gguf.lora import LoraExportReport, export_gguf_lora, write_gguf_lora
from qbara.export.gguf.provenance import provenance_fields, same_model
from qbara.export.gguf.report import ExportReport
from qbara.export.gguf.tensors import EMBEDDING_TYPES

__all__ = ["ARCH", "ARCHITECTURES", "Architecture", "DENSE_TYPES", "EMBEDDING_TYPES", "architecture_of",
           "check_architecture", "FIX_HINT", "LINEARS", "NORMS", "Q4_1_CONFIG", "Q5_1_CONFIG", "ExportReport",
           "LoraExportReport", "check_llama", "export_gguf", "export_gguf_lora", "is_plain_lora",
           "llama_rope_permutation", "provenance_fields", "resolve_linears", "same_model", "write_gguf",
           "write_gguf_lora"]
