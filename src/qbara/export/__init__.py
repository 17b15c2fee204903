"""Shipping fine-tuned models: GGUF files (base and LoRA adapter) and dense Hugging Face folders."""
from qbara.export.gguf import export_gguf, export_gguf_lora
from qbara.export.hf import export_hf

__all__ = ["export_gguf", "export_gguf_lora", "export_hf"]
