"""Shipping fine-tuned models: GGUF (Q4_1, bit-exact for INT4 G32 merges) and dense Hugging Face folders."""
from qbara.export.gguf import ExportReport, check_llama, export_gguf, llama_rope_permutation
from qbara.export.hf import dense_copy, export_hf

__all__ = ["ExportReport", "export_gguf", "export_hf", "dense_copy", "check_llama", "llama_rope_permutation"]
