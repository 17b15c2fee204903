"""How qbara's adapters appear to PEFT: tensor names, per-module patterns, and the adapter_config.json of a
method PEFT has no layer for (its peft_type says what loads it, so PEFT's KeyError shows that)."""
from __future__ import annotations

import re

from qbara.errors import QbaraError

PREFIX = "base_model.model."  # PEFT's tensor names: PREFIX + <layer>.<parameter>
_NOTE = ("Only qbara loads this {method} adapter (qbara.load_adapter, or --adapter on the qbara CLI): PEFT has no "
        "equivalent layer. For other tools, merge it: `qbara export --model BASE --adapter THIS_FOLDER --format hf "
        "--out DIR` writes a plain Hugging Face model (or --format gguf).")


def qbara_only_fields(method: str, alpha: float) -> dict:
    """The adapter_config.json entries of a `method` adapter PEFT cannot load."""
    return {"peft_type": _peft_type_for(method), "lora_alpha": alpha, "qbara_note": _NOTE.format(method=method)}


def _peft_type_for(method: str) -> str:
    """The peft_type of a method PEFT has no layer for; PEFT shows it in its KeyError."""
    return f"{method.upper()} (a qbara adapter: PEFT cannot load it; use qbara.load_adapter, see qbara_note)"


def pattern_keys(values: dict, default) -> dict:
    """PEFT pattern keys for the names whose value is not `default`: the last name component when that selects
    names of one value only, else the escaped full name."""
    by_suffix: dict[str, set] = {}
    for name, value in values.items():
        by_suffix.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    keys = {}
    for name, value in values.items():
        if value == default:
            continue
        suffix = name.rsplit(".", 1)[-1]
        keys[suffix if len(by_suffix[suffix]) == 1 else re.escape(name)] = value
    return keys


def pattern_value(pattern: dict, name: str, default):
    """The value PEFT gives module `name` under `pattern` (first key matching a dotted suffix), else default."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as err:
            raise QbaraError(f"alpha_pattern key {key!r} is not a valid regular expression ({err}); "
                             f"fix the key in adapter_config.json") from None
    return default
