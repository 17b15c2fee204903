"""How qbara's adapter methods appear in PEFT's adapter_config.json, and the QA-LoRA scaling between the two.

- lora: a plain PEFT LoRA config.
- qalora: PEFT's QA-LoRA (`use_qalora=True`, `qalora_group_size=G`). PEFT multiplies the average-pooled input
  by the number of groups n = d_in / G before A (a sum-pooling), qbara does not (the pooling divisor sets the
  training dynamics: under Adam at a fixed learning rate, sum pooling at G = 32 moves ΔW 32x faster than average
  pooling). The tensors are written unchanged and PEFT's alpha absorbs the factor: lora_alpha = alpha / n, per
  layer through `alpha_pattern` where d_in differs. PEFT runs QA-LoRA only on GPTQ layers;
  `qbara.register_with_peft` adds it for qbara's QuantizedLinear and for nn.Linear.
- qbara, qahira (and a qalora whose layers pool differently): no PEFT equivalent. peft_type names the method
  and what loads it (`peft_type_for`), so PEFT stops at once with that text in its KeyError, and `qbara_note`
  tells the reader how to get a plain model. Folders of earlier versions say just the method ("QAHIRA").
"""
from __future__ import annotations

import re
from collections import Counter

from qbara.errors import QbaraError

NOTE = ("Only qbara loads this {method} adapter (qbara.load_adapter, or --adapter on the qbara CLI): PEFT has no "
        "equivalent layer. For other tools, merge it: `qbara export --model BASE --adapter THIS_FOLDER --format hf "
        "--out DIR` writes a plain Hugging Face model (or --format gguf).")


def peft_method_fields(method: str, layers: dict, alpha: float) -> dict:
    """The adapter_config.json entries that say how PEFT should read `layers` (name -> adapter layer)."""
    if method == "lora":
        return {"peft_type": "LORA", "lora_alpha": alpha}
    pools = {layer.pool_in for layer in layers.values()}
    if method == "qalora" and len(pools) == 1:
        group = pools.pop()
        groups = {name: layer.in_features // group for name, layer in layers.items()}
        default = Counter(groups.values()).most_common(1)[0][0]
        pattern = {key: alpha / n for key, n in _pattern_keys(groups, default).items()}
        return {"peft_type": "LORA", "lora_alpha": alpha / default, "alpha_pattern": pattern,
                "use_qalora": True, "qalora_group_size": group}
    return {"peft_type": peft_type_for(method), "lora_alpha": alpha, "qbara_note": NOTE.format(method=method)}


def peft_type_for(method: str) -> str:
    """The peft_type of a method PEFT has no layer for: PEFT refuses it with `KeyError: '<this text>'`, so it
    says what loads the folder."""
    return f"{method.upper()} (a qbara adapter: PEFT cannot load it; use qbara.load_adapter, see qbara_note)"


def _pattern_keys(values: dict, default) -> dict:
    """PEFT pattern keys (matched as a suffix of the module name) for the names whose value is not `default`:
    the last name component when it alone selects names of one value, else the escaped full name."""
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
