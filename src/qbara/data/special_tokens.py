"""What a tokenizer adds around a text by default (its BOS first, its EOS last): a model trained that way (Gemma)
expects the BOS before any text it reads, so calibration windows must start with it too."""
from __future__ import annotations

__all__ = ["adds_token", "leading_bos"]


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
