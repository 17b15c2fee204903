"""Export a model as a plain (dense) Hugging Face folder: safetensors weights, config and tokenizer."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qbara.adapters import adapter_layers, merge
from qbara.errors import QbaraError
from qbara.models.streaming import dequantize_model
from qbara.outputs import output_folder
from qbara.state import state_of

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise QbaraError(f"unknown dtype {dtype!r} for the exported weights: choose float32, bfloat16 or float16")


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with adapters merged and every QuantizedLinear dequantized to fp32 nn.Linear; its state
    keeps the reports and forgets the base. `model` is unchanged."""
    dense = copy.deepcopy(model)
    if adapter_layers(dense):
        merge(dense, into="dense")
    dequantize_model(dense)
    state_of(dense).forget_base()  # a plain dense model now
    return dense


def export_hf(model: nn.Module, tokenizer, out_dir, dtype="float32", overwrite: bool = False) -> Path:
    """Write `dense_copy(model)` and `tokenizer` as a Hugging Face folder (safetensors) at `out_dir`, built beside
    it and swapped in when complete; a non-empty folder qbara did not write is refused unless `overwrite`."""
    dtype = _resolve_dtype(dtype)
    with output_folder(out_dir, overwrite=overwrite, command="export_hf", option="out_dir") as tmp:
        write_hf(model, tokenizer, tmp, dtype)
    return Path(out_dir).expanduser()


def write_hf(model: nn.Module, tokenizer, folder, dtype="float32") -> Path:
    """Write the dense HF files of `model` into the (new, empty) `folder`; see `export_hf`."""
    dtype = _resolve_dtype(dtype)
    if not hasattr(model, "save_pretrained"):
        raise QbaraError(f"export_hf needs a Hugging Face model (with save_pretrained); got {type(model).__name__}")
    dense = dense_copy(model).to(dtype)
    dense.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)
