"""Shipping fine-tuned models: GGUF (bit-exact for INT4 / INT5 G32 merges and gguf:* layers; LoRA adapter GGUFs) and
dense Hugging Face folders."""
from qbara.export.gguf import export_gguf, export_gguf_lora
from qbara.export.hf import export_hf

__all__ = ["export_gguf", "export_gguf_lora", "export_hf"]
