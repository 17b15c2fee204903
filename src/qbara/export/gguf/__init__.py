"""Export a (merged) model as a GGUF file llama.cpp and transformers load, and plain LoRA adapters as a LoRA GGUF
(llama.cpp `--lora`). INT4 / INT5 G32 and gguf:* linears are written bit for bit from their own codes (as Q4_1 /
Q5_1, or their own blocks); anything else needs `lossy=True`. One table entry per architecture (`architectures`).
"""
from qbara.export.gguf.base import export_gguf, write_gguf
from qbara.export.gguf.linears import LINEARS, is_plain_lora, llama_rope_permutation
from qbara.export.gguf.lora import export_gguf_lora, write_gguf_lora
from qbara.export.gguf.tensors import EMBEDDING_TYPES

__all__ = ["EMBEDDING_TYPES", "LINEARS", "export_gguf", "export_gguf_lora", "is_plain_lora", "llama_rope_permutation",
           "write_gguf", "write_gguf_lora"]
