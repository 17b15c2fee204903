"""`tokenizer.*` GGUF metadata: copied from a source GGUF, or built from a Hugging Face fast tokenizer
(byte-level BPE as llama.cpp's "gpt2" model, SentencePiece BPE as its "llama" model)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, TokenType

from qbara.data.special_tokens import adds_token
from qbara.errors import QbaraError
from qbara.models.smollm2 import smollm2_gguf_path
from qbara.validate import gguf_reader

# SmolLM2-135M's vocabulary size: a cheap test before comparing a tokenizer with the shipped GGUF's.
_SMOLLM2_VOCAB = 49152


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
                         f"GGUF export needs a fast tokenizer (load it with use_fast=True)")
    return json.loads(backend.to_str())


def _steps(component: dict | None) -> list[dict]:
    """A normalizer or pre-tokenizer as its flat list of steps (a Sequence unrolled)."""
    if not component:
        return []
    inner = component.get("pretokenizers", component.get("normalizers"))
    if component.get("type") == "Sequence" and inner is not None:
        return [step for part in inner for step in _steps(part)]
    return [component]


# Byte-level BPE pre-tokenizers llama.cpp knows, by the name it reads from `tokenizer.ggml.pre`, keyed by their
# steps as `_pre_signature` spells them (what llama.cpp takes from the name). Where several names behave alike
# ("llama-bpe" / "smaug-bpe", "smollm" / "starcoder"), the best-known model's is used.
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (("byte-level", _GPT2_WORDS),): "gpt-2",
    (("digits", "individual"), ("byte-level", _GPT2_WORDS)): "smollm",
    (("split", _LLAMA3_SPLIT), ("byte-level", None)): "llama-bpe",
    (("split", _QWEN2_SPLIT), ("byte-level", None)): "qwen2",
}


def _pre_step(step: dict) -> tuple:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return ("byte-level with a prefix space",)
        return ("byte-level", _GPT2_WORDS if step.get("use_regex", True) else None)
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        pattern = step.get("pattern", {})
        return ("split", pattern.get("Regex", pattern.get("String")))
    if kind == "Digits":
        return ("digits", "individual" if step.get("individual_digits") else "runs")
    return (json.dumps(step, sort_keys=True),)


def _pre_signature(spec: dict) -> tuple:
    return tuple(_pre_step(step) for step in _steps(spec.get("pre_tokenizer")))


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE tokenizer.json (see PRE_TOKENIZERS)."""
    signature = _pre_signature(spec)
    name = PRE_TOKENIZERS.get(signature)
    if name is None:
        raise QbaraError(f"llama.cpp has no pre-tokenizer name qbara knows for this tokenizer's pre-tokenizer "
                         f"{signature}; known: {sorted(PRE_TOKENIZERS.values())}. Pass tokenizer_gguf= a GGUF file "
                         f"of the same model (llama.cpp's converter writes its tokenizer) to copy the tokenizer")
    return name


def _is_metaspace_normalizer(step: dict) -> bool:
    return (step.get("type") == "Replace" and step.get("content") == "\u2581") or (
        step.get("type") == "Prepend" and step.get("prepend") == "\u2581")


def _tokenizer_model(spec: dict) -> str:
    """llama.cpp's tokenizer model for a tokenizer.json: "gpt2" (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM)
    or "llama" (SentencePiece BPE with byte fallback: Llama 2, Mistral, Gemma, Phi-3)."""
    model = spec.get("model", {})
    kind = model.get("type")
    pre_steps = _steps(spec.get("pre_tokenizer"))
    if kind == "BPE" and any(step.get("type") == "ByteLevel" for step in pre_steps):
        return "gpt2"
    sentencepiece_spaces = any(step.get("type") == "Metaspace" for step in pre_steps) or any(
        _is_metaspace_normalizer(step) for step in _steps(spec.get("normalizer")))
    if kind == "BPE" and (model.get("byte_fallback") or sentencepiece_spaces):
        return "llama"
    if kind == "Unigram":
        raise QbaraError("this tokenizer is a Unigram (T5-style SentencePiece) model; qbara's GGUF export writes "
                         "byte-level BPE (gpt2) and SentencePiece BPE (llama) tokenizers only. Pass tokenizer_gguf= "
                         "a GGUF file of the same model to copy its tokenizer")
    raise QbaraError(f"GGUF export supports byte-level BPE (ByteLevel pre-tokenizer) and SentencePiece BPE "
                     f"(byte_fallback, Metaspace) tokenizers; this one is {kind!r} with pre-tokenizer steps "
                     f"{[step.get('type') for step in pre_steps]}. Pass tokenizer_gguf= a GGUF file of the same "
                     f"model to copy its tokenizer")


def _is_nfc(step: dict) -> bool:
    return step.get("type") == "NFC"


# Normalizer steps each GGUF tokenizer model can stand for. llama.cpp's SentencePiece spells spaces as "▁"
# (with the optional dummy prefix); its byte-level BPE normalizes nothing, and NFC (Qwen's) is let through:
# it changes only text that is not already NFC, as nearly all text is.
_NORMALIZERS = {"gpt2": (_is_nfc,), "llama": (_is_metaspace_normalizer,)}


def _splits_on_spaces(step: dict) -> bool:
    return step.get("type") == "Metaspace" or (step.get("type") == "Split" and step.get("pattern") in (
        {"String": " "}, {"String": "\u2581"}))


# SentencePiece pre-tokenizer steps: Metaspace (Llama 2, Mistral), a split at spaces (Gemma). A byte-level
# BPE's steps are checked whole, by PRE_TOKENIZERS.
_SENTENCEPIECE_PRE_STEPS = (_splits_on_spaces,)


def _check_representable(spec: dict, model: str) -> None:
    """Refuse normalizer or pre-tokenizer steps llama.cpp cannot reproduce for this model (lowercasing, NFKC,
    a charsmap, a digit split before SentencePiece, ...)."""
    odd = [("normalizer", step.get("type")) for step in _steps(spec.get("normalizer"))
           if not any(allowed(step) for allowed in _NORMALIZERS[model])]
    if model == "llama":
        odd += [("pre-tokenizer", step.get("type")) for step in _steps(spec.get("pre_tokenizer"))
                if not any(allowed(step) for allowed in _SENTENCEPIECE_PRE_STEPS)]
    if odd:
        raise QbaraError(f"this tokenizer's steps {odd} have no counterpart in llama.cpp's {model!r} tokenizer, "
                         f"which would encode text differently. Pass tokenizer_gguf= a GGUF file of the same model "
                         f"to copy its tokenizer")


def _add_space_prefix(spec: dict) -> bool:
    """SentencePiece's dummy prefix: Metaspace prepending "▁" (scheme first/always) or a Prepend("▁") normalizer."""
    for step in _steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            return scheme in ("first", "always")
    return any(step.get("type") == "Prepend" and step.get("prepend") == "\u2581"
               for step in _steps(spec.get("normalizer")))


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _token_types(tokenizer, tokens: list[str], model: str, unk_id) -> list[int]:
    """NORMAL, except: added tokens CONTROL (special) or USER_DEFINED; for SentencePiece the unknown token
    UNKNOWN and the byte-fallback tokens <0xNN> BYTE; ids the vocabulary skips ("[PAD<i>]") UNUSED."""
    vocab = tokenizer.get_vocab()
    types = [int(TokenType.NORMAL if token in vocab else TokenType.UNUSED) for token in tokens]
    if model == "llama":
        for index, token in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(token):
                types[index] = int(TokenType.BYTE)
        if unk_id is not None and unk_id < len(types):
            types[unk_id] = int(TokenType.UNKNOWN)
    for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if index < len(types) and types[index] == TokenType.NORMAL:
            types[index] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    return types


# Scores of tokens llama.cpp's SentencePiece tokenizer never builds by merging (its converter's convention).
_UNMERGED_SCORE = {TokenType.USER_DEFINED: -1000.0, TokenType.UNUSED: -1000.0}


def _sentencepiece_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """Per-token scores for llama.cpp's SentencePiece BPE, which merges the adjacent pair whose joined token
    scores highest: a token made by merge number r scores -r, so merges apply in the tokenizer.json's order;
    other normal tokens score below every merge, in id order; control, byte and unknown tokens 0."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    scores = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TokenType.NORMAL:
            scores.append(float(-rank[token]) if token in rank else float(-len(merges) - index))
        else:
            scores.append(_UNMERGED_SCORE.get(TokenType(kind), 0.0))
    return scores


# Tokens that end a turn in chat templates (Llama 3, Gemma, ChatML, Phi-3, Llama 3.1's tool call end).
_END_OF_TURN = {"eot_token_id": ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>"),
               "eom_token_id": ("<|eom_id|>",)}


def _end_of_turn_ids(tokenizer, template: str | None) -> dict[str, int]:
    """eot/eom ids: a known end-of-turn token the chat template writes, when it is not already the eos."""
    if not template:
        return {}
    vocab = tokenizer.get_vocab()
    found = {}
    for key, candidates in _END_OF_TURN.items():
        for token in candidates:
            if token in template and token in vocab and vocab[token] != tokenizer.eos_token_id:
                found[key] = int(vocab[token])
                break
    return found


def fields_from_hf(tokenizer, vocab_size: int) -> TokenizerFields:
    """GGUF tokenizer metadata for a Hugging Face fast tokenizer, as llama.cpp's "gpt2" (byte-level BPE) or
    "llama" (SentencePiece BPE, with per-token scores) model; tokens padded with "[PAD<i>]" (UNUSED) up to
    `vocab_size`. GGUF cannot express one difference: llama.cpp adds SentencePiece's dummy prefix before a
    leading space, where transformers' Metaspace does not."""
    spec = _backend_json(tokenizer)
    model = _tokenizer_model(spec)
    _check_representable(spec, model)
    # llama.cpp reads no pre-tokenizer for SentencePiece; its converter still writes "default" there
    pre = _pre_tokenizer_name(spec) if model == "gpt2" else "default"
    raw_merges = spec["model"].get("merges", [])
    if any(not isinstance(m, str) and any(" " in part for part in m) for m in raw_merges):
        raise QbaraError("a merge of this tokenizer joins pieces holding a space, which GGUF's \"left right\" merges "
                         "cannot spell; pass tokenizer_gguf= a GGUF file of the same model to copy its tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]

    tokens = _id_to_token(tokenizer)
    if len(tokens) > vocab_size:
        raise QbaraError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows")
    unk_id = getattr(tokenizer, "unk_token_id", None)
    types = _token_types(tokenizer, tokens, model, unk_id)
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(int(TokenType.UNUSED))

    out = TokenizerFields(source="built from the Hugging Face tokenizer")
    out.add("tokenizer.ggml.model", model, GGUFValueType.STRING)
    out.add("tokenizer.ggml.pre", pre, GGUFValueType.STRING)
    out.add("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
    if model == "llama":
        scores = _sentencepiece_scores(tokens, types, merges)
        out.add("tokenizer.ggml.scores", scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    out.add("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    if merges:
        out.add("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING)
    elif model == "gpt2":
        # GGUF arrays cannot be empty. Without merges a reader derives them from the vocabulary and
        # per-token scores (transformers does; none exist for a pure byte vocabulary).
        out.add("tokenizer.ggml.scores", [0.0] * len(tokens), GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "unknown_token_id": unk_id, "padding_token_id": tokenizer.pad_token_id}
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) and template else None
    special.update(_end_of_turn_ids(tokenizer, template))
    for key, value in special.items():
        if value is not None:
            out.add(f"tokenizer.ggml.{key}", int(value), GGUFValueType.UINT32)
    out.add("tokenizer.ggml.add_bos_token", adds_token(tokenizer, tokenizer.bos_token_id, 0), GGUFValueType.BOOL)
    add_eos = adds_token(tokenizer, tokenizer.eos_token_id, -1)
    if add_eos or model == "llama":
        out.add("tokenizer.ggml.add_eos_token", add_eos, GGUFValueType.BOOL)
    out.add("tokenizer.ggml.add_space_prefix", model == "llama" and _add_space_prefix(spec), GGUFValueType.BOOL)
    if template is not None:
        out.add("tokenizer.chat_template", template, GGUFValueType.STRING)
    return out


def _matches_gguf_tokens(tokenizer, reader: GGUFReader) -> bool:
    """True when the tokenizer's id -> token table is the GGUF file's token list."""
    fld = reader.fields.get("tokenizer.ggml.tokens")
    if fld is None:
        return False
    return _id_to_token(tokenizer) == list(fld.contents())


def shipped_smollm2_reader(tokenizer) -> tuple[Path, GGUFReader] | None:
    """(path, reader) of the shipped SmolLM2 GGUF when `tokenizer` is SmolLM2's; else None."""
    try:
        if len(tokenizer) != _SMOLLM2_VOCAB:
            return None

        path = smollm2_gguf_path()
    except Exception:  # not installed, odd tokenizer: build the metadata from the tokenizer instead
        return None
    reader = gguf_reader(path)
    return (path, reader) if _matches_gguf_tokens(tokenizer, reader) else None
