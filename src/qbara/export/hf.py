"""Export a model as a plain (dense) Hugging Face folder: safetensors weights, config and tokenizer."""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from qbara.atomic import current_umask
from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Attributes qbara sets on a model; they are not part of a Hugging Face checkpoint.
_QBARA_ATTRS = ("qbara_adapter_config", "qbara_base_fingerprint")


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise QbaraError(f"unknown dtype {dtype!r} for the exported weights: choose float32, bfloat16 or float16")


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with adapters merged and every QuantizedLinear replaced by an fp32 nn.Linear."""
    from qbara.adapters import adapter_layers
    from qbara.targets import set_submodule

    dense = copy.deepcopy(model)
    for name, layer in adapter_layers(dense).items():
        set_submodule(dense, name, layer.merge("dense"))
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias.float())
            set_submodule(dense, name, linear)
    for attr in _QBARA_ATTRS:
        if hasattr(dense, attr):
            delattr(dense, attr)
    return dense


def export_hf(model: nn.Module, tokenizer, out_dir, dtype="float32", overwrite: bool = False) -> Path:
    """Write `model` (adapters merged into dense weights, quantized layers dequantized) and `tokenizer`
    as a Hugging Face folder (`save_pretrained`, safetensors) at `out_dir`; returns the folder.

    The folder is built next to its destination and renamed into place when complete. An existing
    non-empty `out_dir` is refused unless `overwrite=True`. The model passed in is not modified.
    """
    dtype = _resolve_dtype(dtype)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise QbaraError(f"{str(out)!r} exists and is not a folder; choose a folder path for the HF export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QbaraError(f"{str(out)!r} already exists and is not empty; choose a new folder or pass "
                         f"overwrite=True (CLI: --overwrite)")
    if not hasattr(model, "save_pretrained"):
        raise QbaraError(f"export_hf needs a Hugging Face model (with save_pretrained); got {type(model).__name__}")

    dense = dense_copy(model).to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        dense.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "old")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
