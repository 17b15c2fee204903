"""Adapters PEFT wrote: a LoRA folder's config and tensors read into qbara's record, or refused with the reason.

PEFT's LoRA is qbara's `lora` method: Delta(x) = s * B A x, s = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora, which qbara expresses as alpha = lora_alpha * sqrt(r)); the tensors keep PEFT's names. PEFT's
QA-LoRA (use_qalora) is qbara's `qalora` with pool_in = qalora_group_size and alpha = lora_alpha * d_in / G
(PEFT sum-pools, see `qbara.adapters.peft_layout`). qbara keeps one alpha per adapter: the most common layer
scaling; a layer whose PEFT scaling differs (alpha_pattern, QA-LoRA layers of other widths) has its lora_A
multiplied by the ratio on load (`a_scale`), the same forward. What qbara cannot represent is refused: DoRA,
per-layer ranks, bias training, modules_to_save and other tuner types. PEFT records no fingerprint of its base,
so the base cannot be verified.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from torch import nn

from qbara.adapters.peft_layout import pattern_value
from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear

UNSUPPORTED = {  # PEFT LoraConfig key -> (value that is fine, why qbara refuses anything else)
    "use_dora": (False, "DoRA's magnitude vector"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style) weights"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a trained LoRA bias"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "rank_pattern": ({}, "per-layer ranks (rank_pattern)"),
    "layer_replication": (None, "layer replication"),
}


def peft_record(data: dict, state_keys, model: nn.Module, directory) -> dict:
    """qbara's adapter record for the PEFT LoRA folder `directory` (config `data`, tensor names
    `state_keys`) on `model`."""
    # lazy: cycle: qbara.adapters.io imports this module
    from qbara.adapters.io import PREFIX

    where = Path(directory) / "adapter_config.json"
    if str(data.get("peft_type", "")).upper() != "LORA":
        raise QbaraError(f"{where}: a PEFT {data.get('peft_type')!r} adapter; qbara reads PEFT LoRA adapters only")
    for key, (fine, what) in UNSUPPORTED.items():
        value = data.get(key, fine)
        if value not in (fine, None, [], {}) or (fine is None and value):
            raise QbaraError(f"{where}: {key}={value!r} — qbara cannot represent {what}; merge it in PEFT "
                             f"(merge_and_unload) and load the merged model instead")
    rank, lora_alpha = data.get("r"), data.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or not _number(lora_alpha):
        raise QbaraError(f"{where}: r={rank!r} and lora_alpha={lora_alpha!r} must be a positive integer and a "
                         f"finite number > 0")
    suffix = ".lora_A.weight"
    names = sorted(k[len(PREFIX):-len(suffix)] for k in state_keys if k.startswith(PREFIX) and k.endswith(suffix))
    if not names:
        raise QbaraError(f"{Path(directory) / 'adapter_model.safetensors'}: no LoRA tensors "
                         f"({PREFIX}<layer>{suffix}); the folder is empty or not a LoRA adapter")
    group = _qalora_group(data, where)
    layers = {}
    for name in names:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise QbaraError(f"{where}: layer {name!r} does not exist in this model; load the base model the "
                             f"adapter was trained on") from None
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise QbaraError(f"{where}: {name} is a {type(base).__name__}, not a linear layer qbara adapts")
        layers[name] = {"in_features": base.in_features, "out_features": base.out_features, "pool_in": group,
                        "pool_out": 1, "quant": None}
    alpha, a_scale = _alphas(data, layers, group, where)
    adapter = {"method": "qalora" if data.get("use_qalora") else "lora", "rank": rank, "alpha": alpha,
               "dropout": float(data.get("lora_dropout") or 0.0), "target_modules": names}
    if data.get("use_qalora"):
        adapter["pool_in"] = group
    return {"format_version": 1, "adapter": adapter, "base_fingerprint": None, "layers": layers, "peft": True,
            "a_scale": a_scale}


def _qalora_group(data: dict, where) -> int:
    """The input pooling of the folder's layers: QA-LoRA's qalora_group_size, 1 for plain LoRA."""
    if not data.get("use_qalora"):
        return 1
    group = data.get("qalora_group_size", 16)  # PEFT's default
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise QbaraError(f"{where}: qalora_group_size={group!r} must be a positive integer")
    return group


def _alphas(data: dict, layers: dict, group: int, where) -> tuple[float, dict[str, float]]:
    """qbara's one alpha for PEFT's per-layer scalings (alpha_pattern; QA-LoRA's alpha / groups), and the factor
    that each other layer's lora_A takes so that its scaling stays PEFT's (only factors != 1 are listed)."""
    pattern, default = data.get("alpha_pattern") or {}, data["lora_alpha"]
    if not isinstance(pattern, dict) or not all(_number(v) for v in pattern.values()):
        raise QbaraError(f"{where}: alpha_pattern={pattern!r} must map module names to finite numbers > 0")
    factor = math.sqrt(data["r"]) if data.get("use_rslora") else 1.0
    alphas = {name: float(pattern_value(pattern, name, default)) * factor
              * (record["in_features"] // group if data.get("use_qalora") else 1) for name, record in layers.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return alpha, {name: a / alpha for name, a in alphas.items() if a != alpha}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
