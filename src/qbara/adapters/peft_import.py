"""Adapters PEFT wrote: a LoRA folder's config and tensors read into qbara's record, or refused with the reason.

PEFT's LoRA is qbara's `lora` method: Delta(x) = s * B A x, s = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora, which qbara expresses as alpha = lora_alpha * sqrt(r)); the tensors keep PEFT's names. What qbara
cannot represent is refused: DoRA, per-layer rank/alpha patterns, bias training, modules_to_save, QA-LoRA's
PEFT layout and other tuner types. PEFT records no fingerprint of its base, so the base cannot be verified.
"""
from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from qbara.errors import QbaraError

UNSUPPORTED = {  # PEFT LoraConfig key -> (value that is fine, why qbara refuses anything else)
    "use_dora": (False, "DoRA's magnitude vector"),
    "use_qalora": (False, "PEFT's QA-LoRA layout (save it as a plain LoRA, or train QA-LoRA in qbara)"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style) weights"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a trained LoRA bias"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "rank_pattern": ({}, "per-layer ranks (rank_pattern)"),
    "alpha_pattern": ({}, "per-layer alphas (alpha_pattern)"),
    "layer_replication": (None, "layer replication"),
}


def peft_record(data: dict, state_keys, model: nn.Module, directory) -> dict:
    """qbara's adapter record for the PEFT LoRA folder `directory` (config `data`, tensor names
    `state_keys`) on `model`."""
    from qbara.adapters.io import PREFIX
    from qbara.nn.quantized_linear import QuantizedLinear

    where = Path(directory) / "adapter_config.json"
    if str(data.get("peft_type", "")).upper() != "LORA":
        raise QbaraError(f"{where}: a PEFT {data.get('peft_type')!r} adapter; qbara reads PEFT LoRA adapters only")
    for key, (fine, what) in UNSUPPORTED.items():
        value = data.get(key, fine)
        if value not in (fine, None, [], {}) or (fine is None and value):
            raise QbaraError(f"{where}: {key}={value!r} — qbara cannot represent {what}; merge it in PEFT "
                             f"(merge_and_unload) and load the merged model instead")
    rank, lora_alpha = data.get("r"), data.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or not isinstance(lora_alpha, (int, float)):
        raise QbaraError(f"{where}: r={rank!r} and lora_alpha={lora_alpha!r} must be a positive integer and a number")
    alpha = float(lora_alpha) * math.sqrt(rank) if data.get("use_rslora") else float(lora_alpha)
    suffix = ".lora_A.weight"
    names = sorted(k[len(PREFIX):-len(suffix)] for k in state_keys if k.startswith(PREFIX) and k.endswith(suffix))
    if not names:
        raise QbaraError(f"{Path(directory) / 'adapter_model.safetensors'}: no LoRA tensors "
                         f"({PREFIX}<layer>{suffix}); the folder is empty or not a LoRA adapter")
    layers = {}
    for name in names:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise QbaraError(f"{where}: layer {name!r} does not exist in this model; load the base model the "
                             f"adapter was trained on") from None
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise QbaraError(f"{where}: {name} is a {type(base).__name__}, not a linear layer qbara adapts")
        layers[name] = {"in_features": base.in_features, "out_features": base.out_features, "pool_in": 1,
                        "pool_out": 1, "quant": None}
    adapter = {"method": "lora", "rank": rank, "alpha": alpha, "dropout": float(data.get("lora_dropout") or 0.0),
               "target_modules": names}
    return {"format_version": 1, "adapter": adapter, "base_fingerprint": None, "layers": layers, "peft": True}
