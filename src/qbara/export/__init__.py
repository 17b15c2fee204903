"""Shipping fine-tuned models: GGUF (bit-exact for INT4 / INT5 G32 merges and gguf:* layers; LoRA adapter GGUFs) and
dense Hugging Face folders."""
from qbara.export.gguf import (
    ExportReport,
    LoraExportReport,
    check_llama,
    export_gguf,
    export_gguf_lora,
    llama_rope_permutation,
)
from qbara.export.hf import dense_copy, export_hf

__all__ = ["ExportReport", "LoraExportReport", "check_llama", "dense_copy", "export_gguf", "export_gguf_lora",
           "export_hf", "llama_rope_permutation"]
