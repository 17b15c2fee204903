"""One entry point to get a (model, tokenizer) pair, plus a base-model fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from qbara.errors import QbaraError

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = (DEFAULT_MODEL, "tiny-llama", "tiny-qwen2")


def _choices() -> str:
    return (
        f"one of {', '.join(repr(n) for n in BUILTIN_MODELS)}, a local Hugging Face model folder "
        "(containing config.json) or a local .gguf file"
    )


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype) and resolved.is_floating_point:
            return resolved
    raise QbaraError(f"Unknown dtype {dtype!r}: use float32, bfloat16 or float16")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
    """Load a causal LM and its tokenizer; the model is returned in eval mode.

    ``name_or_path`` is ``"smollm2-135m"`` (the embedded default, converted once into the
    qbara cache), ``"tiny-llama"`` / ``"tiny-qwen2"`` (random test models, seed 0), a local
    Hugging Face folder with a ``config.json``, a folder saved by ``save_quantized`` (loaded
    quantized), or a local ``.gguf`` file (dequantized).
    """
    dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    key = name.strip().lower()

    if key == DEFAULT_MODEL:
        from qbara.models.smollm2 import smollm2_dir

        model, tokenizer = _load_hf_folder(smollm2_dir(), dtype)
    elif key == "tiny-llama":
        from qbara.models.tiny import tiny_llama

        model, tokenizer = tiny_llama()
    elif key == "tiny-qwen2":
        from qbara.models.tiny import tiny_qwen2

        model, tokenizer = tiny_qwen2()
    else:
        path = Path(name).expanduser()
        from qbara.models.quantized_io import is_quantized_folder, load_quantized

        if path.is_dir() and is_quantized_folder(path):
            # Packed buffers keep their dtypes (fp16 scales and minima): move, never cast.
            model, tokenizer = load_quantized(path, dtype)
            return model.to(device=device).eval(), tokenizer
        if path.is_dir() and (path / "config.json").is_file():
            model, tokenizer = _load_hf_folder(path, dtype)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            from qbara.models.smollm2 import load_gguf_as_hf

            model, tokenizer = load_gguf_as_hf(path)
        elif path.is_dir():
            raise QbaraError(f"The folder {name!r} has no config.json. Expected {_choices()}.")
        elif path.exists():
            raise QbaraError(f"{name!r} is not a model folder or a .gguf file. Expected {_choices()}.")
        else:
            raise QbaraError(f"Unknown model {name!r}. Expected {_choices()}.")

    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def _load_hf_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise QbaraError(f"Cannot load the model folder {str(path)!r}: {exc}") from exc
    return model, tokenizer


# How many leading values of each sampled weight enter the fingerprint.
_FINGERPRINT_VALUES = 64


def model_fingerprint(model) -> str:
    """A short, stable hex digest identifying a base model.

    Hashes the architecture (model_type, hidden size, layer count, vocab size) and the first
    64 values of the input embedding and of the first and last ``nn.Linear`` weight. Values
    are rounded to bfloat16 first, so the same checkpoint loaded in float32 or bfloat16 gives
    the same fingerprint. Compute it on the unquantized base model; for a model whose linears are
    already quantized (a loaded quantized folder, or the Q of an LQ-LoRA / LoftQ decomposition) the
    packed buffers of the first and last quantized layer are hashed too, so that base is told apart
    from another quantization of the same weights.
    """
    from qbara.nn.quantized_linear import QuantizedLinear

    config = model.config
    arch = {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    samples = [model.get_input_embeddings().weight]
    if linears:
        samples += [linears[0].weight, linears[-1].weight]
    for weight in samples:
        values = weight.detach().reshape(-1)[:_FINGERPRINT_VALUES]
        values = values.to(device="cpu", dtype=torch.bfloat16).to(torch.float32)
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(values.contiguous().numpy().tobytes())
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in quantized[:1] + quantized[-1:]:
        digest.update(layer.quant_config.label.encode())
        for name, buffer in sorted(layer.qweight.tensors.items()):
            digest.update(name.encode())
            digest.update(buffer.detach().reshape(-1)[:4096].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


__all__ = ["DEFAULT_MODEL", "BUILTIN_MODELS", "load_model", "model_fingerprint"]
