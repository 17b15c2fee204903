"""One entry point to get a (model, tokenizer) pair."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qbara.adapters.methods import ADAPTER_TENSORS
from qbara.errors import QbaraError
from qbara.models import smollm2
from qbara.models.embedded import EMBEDDED_MODELS, SMOLLM2, embedded_dir, embedded_model
from qbara.models.files import (
    LOAD_ERRORS,
    load_config,
    load_gguf_tokenizer,
    load_tokenizer,
    one_line,
    quiet_transformers,
)
from qbara.models.quantized_io import is_quantized_folder, load_quantized
from qbara.models.smollm2 import gguf_config, load_gguf_as_hf
from qbara.models.streaming import load_gguf_stream, load_quantized_stream, quantize_loaded_model
from qbara.models.tiny import byte_tokenizer, tiny_llama, tiny_qwen2
from qbara.native import QUANT_MANIFEST
from qbara.tensor_checks import check_model_values
from qbara.validate import check_hf_folder, check_no_remote_code

DEFAULT_MODEL = SMOLLM2.name
BUILTIN_MODELS = (*EMBEDDED_MODELS, "tiny-llama", "tiny-qwen2")


def _choices() -> str:
    return (
        f"one of {', '.join(repr(n) for n in BUILTIN_MODELS)}, a local Hugging Face model folder "
        "(containing config.json) or a local .gguf file"
    )


def embedded_folder(name_or_path) -> Path | None:
    """The converted HF folder of an embedded model's name (converting it on first use); None for other names."""
    model = embedded_model(name_or_path)
    if model is None:
        return None
    if model is SMOLLM2:
        return smollm2.smollm2_dir()  # looked up now: tests replace it
    return embedded_dir(model, convert=smollm2.convert_gguf_to_hf)


def base_model_path(name_or_path: str | None) -> str | None:
    """`name_or_path` as a base PEFT can load: an embedded model's name becomes its converted folder."""
    folder = embedded_folder(name_or_path) if name_or_path else None
    return str(folder) if folder is not None else name_or_path


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype) and resolved.is_floating_point:
            return resolved
    raise QbaraError(f"Unknown dtype {dtype!r}: use float32, bfloat16 or float16")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device="cpu", quant=None, modules="all-linear",
               progress: bool = False):
    """Load a causal LM and its tokenizer, in eval mode. name_or_path: an embedded model ("smollm2-135m",
    "gemma3-270m"), "tiny-llama" / "tiny-qwen2" (random, seed 0), an HF folder, a `save_quantized` folder or a .gguf
    (dequantized). quant: quantize on load, streaming the target `modules` (`qbara.models.streaming`), so `prepare`
    then only attaches adapters. Without quant, `dtype` defaults to float32."""
    if quant is not None:
        return _load_quantizing(name_or_path, quant, modules, None if dtype is None else _resolve_dtype(dtype),
                                device, progress)
    dtype = _resolve_dtype(dtype if dtype is not None else torch.float32)
    name = str(name_or_path)
    key = name.strip().lower()

    if embedded_model(key) is not None:
        model, tokenizer = _load_hf_folder(embedded_folder(key), dtype)
    elif key == "tiny-llama":
        model, tokenizer = tiny_llama()
    elif key == "tiny-qwen2":
        model, tokenizer = tiny_qwen2()
    else:
        path = Path(name).expanduser()

        if path.is_dir() and (path / "config.json").exists():
            check_no_remote_code(path)  # before anything else reads the folder
        if path.is_dir() and is_quantized_folder(path):
            # Packed buffers keep their dtypes (fp16 scales and minima): move, never cast.
            model, tokenizer = load_quantized(path, dtype)  # checks every tensor it reads
            return model.to(device=device).eval(), tokenizer
        if path.is_dir() and (path / "config.json").is_file():
            model, tokenizer = _load_hf_folder(path, dtype)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer = load_gguf_as_hf(path)
        else:
            _refuse_unknown(path, name)

    check_model_values(model, name)
    model = _cast_parameters(model.to(device=device), dtype)
    model.eval()
    return model, tokenizer


def _refuse_unknown(path: Path, name: str) -> None:
    """The error for a name or path that is no model source `load_model` knows."""
    if path.is_dir():
        _refuse_adapter_folder(path)
        raise QbaraError(f"The folder {name!r} has no config.json. Expected {_choices()}.")
    if path.exists():
        raise QbaraError(f"{name!r} is not a model folder or a .gguf file. Expected {_choices()}.")
    raise QbaraError(f"Unknown model {name!r}. Expected {_choices()}.")


def _model_source(name_or_path) -> tuple[str, Path | None]:
    """What `load_model` would read, no weights read: ("tiny" | "quantized" | "folder" | "gguf", path)."""
    name = str(name_or_path)
    key = name.strip().lower()
    if embedded_model(key) is not None:
        return "folder", embedded_folder(key)
    if key in ("tiny-llama", "tiny-qwen2"):
        return "tiny", None
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        check_no_remote_code(path)
        return ("quantized" if is_quantized_folder(path) else "folder"), path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf", path
    _refuse_unknown(path, name)


def load_model_tokenizer(name_or_path):
    """The tokenizer `load_model` returns, without loading the model (so data is checked first)."""
    kind, path = _model_source(name_or_path)
    if kind == "tiny":
        return byte_tokenizer()  # what tiny_llama / tiny_qwen2 return, built without their weights
    if kind == "gguf":
        return load_gguf_tokenizer(path)
    if kind == "quantized" and not os.path.lexists(path / "tokenizer_config.json"):
        raise QbaraError(f"{path} has no tokenizer (tokenizer_config.json); copy the base model's tokenizer files "
                         f"into it")
    return load_tokenizer(path)


def load_model_config(name_or_path):
    """The config `load_model` builds, from config.json or GGUF metadata only."""
    kind, path = _model_source(name_or_path)
    if kind == "tiny":  # built in memory: a few kB of random weights, no file to read a config from
        build = tiny_llama if str(name_or_path).strip().lower() == "tiny-llama" else tiny_qwen2
        return build()[0].config
    if kind == "gguf":
        return gguf_config(path)
    if kind == "folder":
        check_hf_folder(path)  # no pickle weights; config sizes bounded by the weights' (headers only)
    config = load_config(path)
    if kind == "quantized" and hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


_ADAPTER_FILES = ("adapter_config.json", "qbara_adapter.json")


def _refuse_adapter_folder(path: Path) -> None:
    """Refuse an adapter folder passed where a model is expected, saying how to load it."""
    if any((path / name).is_file() for name in _ADAPTER_FILES):
        raise QbaraError(f"{str(path)!r} is an adapter folder, not a model: load its base and pass the adapter "
                         f"(qbara.load_model(base); qbara.load_adapter(model, dir) / --adapter)")


def _cast_parameters(model, dtype: torch.dtype):
    """Parameters to `dtype`; computed buffers (rotary frequencies) stay fp32, as transformers keeps them."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def _load_quantizing(name_or_path, quant, modules, dtype, device, progress):
    """load_model(..., quant=): stream an HF folder or GGUF file; test models are built, then quantized."""
    name = str(name_or_path)
    key = name.strip().lower()
    path = Path(name).expanduser()
    if embedded_model(key) is not None:
        path = embedded_folder(key)
    elif path.is_dir() and is_quantized_folder(path):
        raise QbaraError(f"{name!r} is already quantized; load it without quant=")
    if path.is_dir() and (path / "config.json").is_file():
        check_hf_folder(path)  # no custom code, no pickle weights, sizes that fit the weights
        model = load_quantized_stream(path, quant, modules, dtype=dtype, device=device, progress=progress)
        return model, load_tokenizer(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        model = load_gguf_stream(path, quant, modules, dtype=dtype, device=device, progress=progress)
        return model, load_gguf_tokenizer(path)

    model, tokenizer = load_model(name, dtype=dtype or torch.float32, device=device)
    return quantize_loaded_model(model, quant, modules, progress), tokenizer


def _load_hf_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    check_hf_folder(path)
    config = load_config(path)
    try:
        with quiet_transformers():  # qbara reports what matters (_check_loading_info) in one line
            model, info = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype,
                                                               local_files_only=True,
                                                               output_loading_info=True, trust_remote_code=False,
                                                               use_safetensors=True)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"Cannot load the model folder {str(path)!r} ({one_line(exc)}); the folder is damaged "
                         f"or not a causal LM transformers knows") from None
    _check_loading_info(info, path)
    return model, load_tokenizer(path)


# Tensor names only qbara's quantized and adapter layers have.
_QBARA_KEYS = (".codes", ".scale", ".minimum", ".absmax", ".base.", *ADAPTER_TENSORS)


def _check_loading_info(info: dict, path) -> None:
    """Refuse weights that do not cover the model exactly (transformers would fill gaps randomly)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or [])
    if any(any(tag in key for tag in _QBARA_KEYS) for key in unexpected):
        raise QbaraError(f"{path} holds packed qbara layers or adapters but no {QUANT_MANIFEST}: it was saved "
                         f"with a plain save_pretrained (before qbara handled it) or lost its manifest, so its linear "
                         f"layers cannot be rebuilt; save the model again with qbara (model.save_pretrained(dir) on a "
                         f"qbara model, or qbara.save_quantized)")
    if missing or unexpected or mismatched:
        more = "..." * (len(missing) > 3)
        raise QbaraError(f"{path}: its weights do not fit its config.json (missing {missing[:3]}{more}, "
                         f"unexpected {unexpected[:3]}, wrong shape {mismatched[:3]}); transformers would fill the "
                         f"gaps with random weights. The folder is incomplete or mixes two models: save it again")


__all__ = ["base_model_path", "load_model", "load_model_tokenizer", "load_model_config"]
