"""Adapters PEFT wrote: a LoRA (or QA-LoRA) folder read into qbara's record, or refused with the reason.

PEFT's scaling is lora_alpha / r (/ sqrt(r) with use_rslora). qbara keeps one alpha, the most common layer's; a
layer whose PEFT scaling differs has its lora_A multiplied by the ratio on load (`a_scale`). DoRA, per-layer
ranks, trained biases and modules_to_save are refused. PEFT records no base fingerprint, so the base is unchecked.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from torch import nn

from qbara.adapters.base import AdapterMethod
from qbara.adapters.methods import METHODS
from qbara.adapters.peft_layout import PREFIX, pattern_value
from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear

_UNSUPPORTED = {  # PEFT LoraConfig key -> (value that is fine, why qbara refuses anything else)
    "use_dora": (False, "DoRA's magnitude vector"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style) weights"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a trained LoRA bias"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "rank_pattern": ({}, "per-layer ranks (rank_pattern)"),
    "layer_replication": (None, "layer replication"),
}


def peft_record(data: dict, state_keys, model: nn.Module, directory) -> dict:
    """qbara's adapter record for the PEFT LoRA folder `directory` (config `data`, tensor names `state_keys`)."""
    where = Path(directory) / "adapter_config.json"
    if str(data.get("peft_type", "")).upper() != "LORA":
        raise QbaraError(f"{where}: a PEFT {data.get('peft_type')!r} adapter; qbara reads PEFT LoRA adapters only")
    for key, (fine, what) in _UNSUPPORTED.items():
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
    method, knobs = _peft_method(data, where)
    group = knobs.get("pool_in", 1)
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
    alpha, a_scale = _alphas(data, layers, group, method, where)
    adapter = {"method": method.name, "rank": rank, "alpha": alpha,
               "dropout": float(data.get("lora_dropout") or 0.0), "target_modules": names, **knobs}
    return {"format_version": 1, "adapter": adapter, "base_fingerprint": None, "layers": layers, "peft": True,
            "a_scale": a_scale}


def _peft_method(data: dict, where) -> tuple[AdapterMethod, dict]:
    """The method that reads the PEFT LoRA config `data`, and the AdapterConfig knobs it reads from it."""
    for method in METHODS.values():
        knobs = method.read_peft(data, where)
        if knobs is not None:
            return method, knobs
    raise QbaraError(f"{where}: no qbara adapter method reads this PEFT LoRA config")


def _alphas(data: dict, layers: dict, group: int, method: AdapterMethod, where) -> tuple[float, dict[str, float]]:
    """qbara's one alpha for PEFT's per-layer scalings, and the lora_A factor of each layer that differs."""
    pattern, default = data.get("alpha_pattern") or {}, data["lora_alpha"]
    if not isinstance(pattern, dict) or not all(_number(v) for v in pattern.values()):
        raise QbaraError(f"{where}: alpha_pattern={pattern!r} must map module names to finite numbers > 0")
    factor = math.sqrt(data["r"]) if data.get("use_rslora") else 1.0
    alphas = {name: float(pattern_value(pattern, name, default)) * factor
              * method.peft_alpha_factor(record["in_features"], group) for name, record in layers.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return alpha, {name: a / alpha for name, a in alphas.items() if a != alpha}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
