"""What a GGUF export accepts: a plain LLaMA model, and an output path ending in .gguf."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from qbara.errors import QbaraError

ARCH = "llama"


def check_llama(model: nn.Module) -> None:
    """Raise a QbaraError unless `model` is a LLaMA-architecture causal LM that llama.cpp's `llama` runs."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llama" or not hasattr(getattr(model, "model", None), "layers"):
        raise QbaraError(f"GGUF export supports LLaMA-architecture models (model_type 'llama', e.g. SmolLM2); "
                         f"this model is {model_type or type(model).__name__!r}. Use export_hf (qbara export "
                         f"--format hf) for other architectures")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("linear biases (attention_bias / mlp_bias)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (llama.cpp's llama uses silu)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r}")
    if problems:
        raise QbaraError(f"GGUF export writes plain LLaMA models; this one has {', '.join(problems)}, which the "
                         f"exporter does not write. Use export_hf (qbara export --format hf) instead")


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def head_dim(config) -> int:
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def check_path(path) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise QbaraError(f"GGUF output path {str(path)!r} must end in .gguf (e.g. model.gguf)")
    if path.is_dir():
        raise QbaraError(f"GGUF output path {str(path)!r} is a directory; give a file name such as "
                         f"{str(path / 'model.gguf')!r}")
    return path
