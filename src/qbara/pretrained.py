"""`from_pretrained`: one call from a model name to a quantized model with adapters (for PEFT habits), and the rules
that pick how an adapter folder's base is quantized on load."""
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

    quant: a QuantConfig (or layer name -> QuantConfig) for the base; None keeps a saved quantized folder as it is.
        With a PEFT adapter folder it is how that adapter's base was quantized (PEFT records no quantization).
    adapter: an AdapterConfig (new adapters to train; needs quant), or a folder qbara saved (loaded, with the
        quantization it records applied to a dense base; the chat template it records, its chat_template.jinja,
        becomes the tokenizer's), or a PEFT LoRA folder, or None. A PEFT folder whose
        base_model_name_or_path is a qbara quantized folder is refused on a dense base without quant.
    """
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
    """Make the chat template the model's adapters were trained with (recorded in their folder, see
    `qbara.adapters.io.read_chat_template`) the tokenizer's, so that merging, exporting, evaluating and generating
    prompt the model as it was trained; adapters without one keep the tokenizer's own."""
    recorded = state_of(model).chat_template
    if recorded is not None and tokenizer is not None:
        tokenizer.chat_template = recorded


def base_quant_for(name_or_path, adapter, quant=None):
    """How to quantize the base `name_or_path` on load for the adapter folder `adapter`: as a qbara adapter
    records (`quant` must then be None); `quant` for a PEFT folder; None for a saved quantized folder (loaded as
    it is) or an adapter that needs the dense base."""
    if read_adapter_config(adapter, peft=True)["qbara"] is None:
        if quant is None:
            _check_peft_base(name_or_path, adapter)
        return quant
    if quant is not None:
        raise QbaraError(f"{str(adapter)!r} is a qbara adapter: its record says how its base is quantized, so no "
                         f"quantization is given for it (drop quant= / --quant, which are for PEFT adapter folders)")
    return None if is_quantized_folder(name_or_path) else adapter_base_quant(adapter)


def _check_peft_base(name_or_path, adapter) -> None:
    """Refuse the dense base `name_or_path` for a PEFT folder whose recorded base (base_model_name_or_path) is a
    qbara quantized folder: its LoRA was trained on that folder's quantized weights."""
    recorded = read_adapter_config(adapter, peft=True).get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or is_quantized_folder(name_or_path):
        return
    if is_quantized_folder(Path(recorded).expanduser()):
        raise QbaraError(f"{Path(adapter) / 'adapter_config.json'}: a PEFT adapter trained on the qbara-quantized "
                         f"base {recorded!r} (its base_model_name_or_path), but {str(name_or_path)!r} is not "
                         f"quantized; load that base (--model {recorded}), or give the base's quantization: "
                         f"--quant FORMAT[:BLOCK] on the CLI (e.g. --quant int4:32), quant=QuantConfig(...) in "
                         f"qbara.from_pretrained")
