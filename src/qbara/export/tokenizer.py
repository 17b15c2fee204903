"""`tokenizer.*` GGUF metadata: copied from a source GGUF, or built from a Hugging Face byte-level BPE tokenizer."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, TokenType

from qbara.errors import QbaraError
from qbara.models.smollm2 import smollm2_gguf_path
from qbara.validate import gguf_reader

# SmolLM2-135M's vocabulary size: a cheap test before comparing a tokenizer with the shipped GGUF's.
SMOLLM2_VOCAB = 49152


@dataclass
class TokenizerFields:
    """Key -> (value, value type, array item type) triples, ready for GGUFWriter.add_key_value."""

    source: str
    fields: dict[str, tuple] = field(default_factory=dict)

    def add(self, key: str, value, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        self.fields[key] = (value, vtype, sub_type)

    def write(self, writer) -> None:
        for key, (value, vtype, sub_type) in self.fields.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)


def fields_from_gguf(path, reader: GGUFReader | None = None) -> TokenizerFields:
    """Every `tokenizer.*` key of an existing GGUF file, with its original value types."""
    reader = reader or gguf_reader(path)
    out = TokenizerFields(source=f"copied from {Path(path).name}")
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.add(key, fld.contents(), vtype, sub_type)
    if "tokenizer.ggml.tokens" not in out.fields:
        raise QbaraError(f"{path} has no tokenizer.ggml.tokens to copy; pass a GGUF file that has a tokenizer")
    return out


def _id_to_token(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1 if vocab else 0
    tokens: list[str | None] = [None] * n
    for token, index in vocab.items():
        tokens[index] = token
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QbaraError(f"the tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                         f"GGUF export needs a byte-level BPE fast tokenizer (load it with use_fast=True)")
    return json.loads(backend.to_str())


def fields_from_hf(tokenizer, vocab_size: int) -> TokenizerFields:
    """GGUF tokenizer metadata for a byte-level BPE Hugging Face tokenizer (llama.cpp's "gpt2" model).

    tokens: id order, padded with "[PAD<i>]" (type UNUSED) up to the model's `vocab_size`;
    special added tokens are CONTROL, other added tokens USER_DEFINED; merges as "left right".
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise QbaraError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    pre = spec.get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", []) or []}
    if "ByteLevel" not in kinds:
        raise QbaraError("GGUF export supports byte-level BPE tokenizers (ByteLevel pre-tokenizer, as GPT-2, "
                         "SmolLM, LLaMA-3 and Qwen use); this tokenizer has none")

    tokens = _id_to_token(tokenizer)
    if len(tokens) > vocab_size:
        raise QbaraError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows")
    types = [int(TokenType.NORMAL)] * len(tokens)
    for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if index < len(types):
            types[index] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(int(TokenType.UNUSED))

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    out = TokenizerFields(source="built from the Hugging Face tokenizer")
    out.add("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING)
    out.add("tokenizer.ggml.pre", "default", GGUFValueType.STRING)
    out.add("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
    out.add("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    if merges:
        out.add("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING)
    else:
        # GGUF arrays cannot be empty. Without merges a reader derives them from the vocabulary and
        # per-token scores (transformers does; none exist for a pure byte vocabulary).
        out.add("tokenizer.ggml.scores", [0.0] * len(tokens), GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            out.add(f"tokenizer.ggml.{key}", int(value), GGUFValueType.UINT32)
    out.add("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), GGUFValueType.BOOL)
    out.add("tokenizer.ggml.add_space_prefix", False, GGUFValueType.BOOL)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.add("tokenizer.chat_template", template, GGUFValueType.STRING)
    return out


def matches_gguf_tokens(tokenizer, reader: GGUFReader) -> bool:
    """True when the tokenizer's id -> token table is the GGUF file's token list."""
    fld = reader.fields.get("tokenizer.ggml.tokens")
    if fld is None:
        return False
    return _id_to_token(tokenizer) == list(fld.contents())


def shipped_smollm2_reader(tokenizer) -> tuple[Path, GGUFReader] | None:
    """(path, reader) of the shipped SmolLM2 GGUF when `tokenizer` is SmolLM2's; else None."""
    try:
        if len(tokenizer) != SMOLLM2_VOCAB:
            return None

        path = smollm2_gguf_path()
    except Exception:  # not installed, odd tokenizer: build the metadata from the tokenizer instead
        return None
    reader = gguf_reader(path)
    return (path, reader) if matches_gguf_tokens(tokenizer, reader) else None
