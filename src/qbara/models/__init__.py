"""Model loading: the embedded SmolLM2 default, tiny random test models, local folders and GGUF files."""

from qbara.fingerprint import model_fingerprint
from qbara.models.loader import load_model
from qbara.models.tiny import tiny_llama

__all__ = ["load_model", "model_fingerprint", "tiny_llama"]
