"""Export a (merged) model as a GGUF file llama.cpp and transformers can load, and plain LoRA adapters as the
LoRA GGUF llama.cpp loads beside it (`--lora`). One table entry per architecture (`architectures`).

Linears quantized with INT4 / INT5 group 32 or a gguf:* block format are written bit for bit from their own codes
(as Q4_1 / Q5_1, or their own blocks); anything else needs `lossy=True`, which re-quantizes and reports the error.

Sections: `architectures` (the table), `checks` (what is accepted), `metadata` (<arch>.* hyper-parameters,
tokenizer fields), `provenance` (general.*), `linears` (layer resolution, rotary row order, block bytes), `tensors` (the
file's tensors), `report`, `base` (the writer), `lora` (the adapter file).
"""
from qbara.export.gguf.base import export_gguf, write_gguf
from qbara.export.gguf.linears import LINEARS, is_plain_lora, llama_rope_permutation
from qbara.export.gguf.lora import export_gguf_lora, write_gguf_lora

__all__ = ["LINEARS", "export_gguf", "export_gguf_lora", "is_plain_lora", "llama_rope_permutation", "write_gguf",
           "write_gguf_lora"]
