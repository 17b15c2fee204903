"""`from_pretrained`: a model name to a quantized model with adapters in one call (for PEFT habits), and the rules
that pick how an adapter folder's base is quantized on load.
"""
from __future__ import annotations

from pathlib import Path

from qbara.adapters.config import AdapterConfig
from qbara.adapters.io import adapter_base_quant, load_adapter, read_adapter_config
from qbara.errors import QbaraError
from qbara.models.loader import load_model
from qbara.models.quantized_io import is_quantized_folder
from qbara.preparation import prepare
from qbara.state import state_of

__all__ = ["from_pretrained", "use_recorded_template", "base_quant_for"]


def from_pretrained(name_or_path, quant=None, adapter=None, *, dtype=None, device="cpu", progress: bool = False):
    """(model, tokenizer): the base quantized as it is loaded (never dense in memory), adapters attached.
    quant: the base's quantization (None keeps a saved quantized folder; for a PEFT folder, its base's).
    adapter: an AdapterConfig (new adapters; needs quant), a qbara adapter folder (its recorded quant and chat template
    applied), a PEFT LoRA folder, or None."""
    if isinstance(adapter, AdapterConfig):
        if quant is None:
            raise QbaraError("new adapters need a quantized base: pass quant=QuantConfig(...) with "
                             "adapter=AdapterConfig")
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, quant=quant, progress=progress)
        return prepare(model, quant, adapter), tokenizer
    if adapter is not None and not isinstance(adapter, (str, Path)):
        raise QbaraError(f"adapter must be an AdapterConfig or an adapter folder, got {type(adapter).__name__}")
    if adapter is not None:
        quant = base_quant_for(name_or_path, adapter, quant)
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, quant=quant, progress=progress)
    if adapter is not None:
        load_adapter(model, adapter)
    use_recorded_template(model, tokenizer)
    return model, tokenizer


def use_recorded_template(model, tokenizer) -> None:
    """Make the adapters' training chat template the tokenizer's, so later steps prompt alike."""
    recorded = state_of(model).chat_template
    if recorded is not None and tokenizer is not None:
        tokenizer.chat_template = recorded


def base_quant_for(name_or_path, adapter, quant=None):
    """How to quantize the base for the adapter folder: as a qbara adapter records (`quant` must be
    None), `quant` for a PEFT folder, None for a saved quantized folder or a dense-base adapter."""
    if read_adapter_config(adapter, peft=True)["qbara"] is None:
        if quant is None:
            _check_peft_base(name_or_path, adapter)
        return quant
    if quant is not None:
        raise QbaraError(f"{str(adapter)!r} is a qbara adapter: its record says how its base is quantized, so no "
                         f"quantization is given for it (drop quant= / --quant, which are for PEFT adapter folders)")
    return None if is_quantized_folder(name_or_path) else adapter_base_quant(adapter)


def _check_peft_base(name_or_path, adapter) -> None:
    """Refuse a dense base for a PEFT folder trained on a qbara quantized folder."""
    recorded = read_adapter_config(adapter, peft=True).get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or is_quantized_folder(name_or_path):
        return
    if is_quantized_folder(Path(recorded).expanduser()):
        raise QbaraError(f"{Path(adapter) / 'adapter_config.json'}: a PEFT adapter trained on the qbara-quantized "
                         f"base {recorded!r} (its base_model_name_or_path), but {str(name_or_path)!r} is not "
                         f"quantized; load that base (--model {recorded}), or give the base's quantization: "
                         f"--quant FORMAT[:BLOCK] on the CLI (e.g. --quant int4:32), quant=QuantConfig(...) in "
                         f"qbara.from_pretrained")
