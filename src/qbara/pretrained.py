"""`from_pretrained`: one call from a model name to a quantized model with adapters, for PEFT habits."""
from __future__ import annotations

from pathlib import Path

from qbara.errors import QbaraError


def from_pretrained(name_or_path, quant=None, adapter=None, *, dtype=None, device="cpu", progress: bool = False):
    """(model, tokenizer): the base quantized as it is loaded (never dense in memory), adapters attached.

    quant: a QuantConfig (or layer name -> QuantConfig) for the base; None keeps a saved quantized folder as it is.
    adapter: an AdapterConfig (new adapters to train; needs quant), or a folder qbara saved (loaded, with the
        quantization it records applied to a dense base), or None.
    """
    from qbara.adapters.config import AdapterConfig
    from qbara.adapters.io import load_adapter
    from qbara.models.loader import load_model
    from qbara.prepare import prepare

    if isinstance(adapter, AdapterConfig):
        if quant is None:
            raise QbaraError("new adapters need a quantized base: pass quant=QuantConfig(...) with "
                             "adapter=AdapterConfig")
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, quant=quant, progress=progress)
        return prepare(model, quant, adapter), tokenizer
    if adapter is not None and not isinstance(adapter, (str, Path)):
        raise QbaraError(f"adapter must be an AdapterConfig or an adapter folder, got {type(adapter).__name__}")
    if adapter is not None and quant is None:
        quant = base_quant_for(name_or_path, adapter)
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, quant=quant, progress=progress)
    if adapter is not None:
        load_adapter(model, adapter)
    return model, tokenizer


def base_quant_for(name_or_path, adapter):
    """How to quantize the base `name_or_path` on load for the adapter folder `adapter`: as the adapter
    records; None for a saved quantized folder (loaded as it is) or an adapter that needs the dense base."""
    from qbara.adapters.io import adapter_base_quant
    from qbara.models.quantized_io import is_quantized_folder

    return None if is_quantized_folder(name_or_path) else adapter_base_quant(adapter)
