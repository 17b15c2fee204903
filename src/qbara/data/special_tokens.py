"""What a tokenizer adds around a text by default (its BOS first, its EOS last): a model trained that way (Gemma)
expects the BOS before any text it reads, so calibration windows, training sequences and prompts start with it too."""
from __future__ import annotations

__all__ = ["adds_token", "leading_bos", "with_bos"]


def adds_token(tokenizer, token_id: int | None, position: int) -> bool:
    """Whether encoding with special tokens puts `token_id` at `position` (0 first, -1 last) of a text."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[position] == token_id and len(ids) > len(tokenizer("a", add_special_tokens=False)
                                                                       ["input_ids"])


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every text by default, or None (SmolLM2 and LLaMA-3 base: none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if adds_token(tokenizer, bos, 0) else None


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """`ids` led by `bos` once: prepended unless already first (a chat template that renders it, as Gemma's does);
    unchanged when `bos` is None."""
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]
