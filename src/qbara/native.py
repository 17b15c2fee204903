"""Writing qbara's native quantized checkpoint: an HF folder whose quantized linears keep their packed buffers:
`config.json`, `qbara_model.safetensors`, `qbara_quant.json` (layer name -> QuantConfig) and the tokenizer. Models
`qbara.state.enable_native_save` marks save through `_save_pretrained` here; reading is `qbara.models.quantized_io`."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file

from qbara.adapters.attach import adapter_layers
from qbara.adapters.io import save_adapter
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.outputs import output_folder
from qbara.state import on_save_pretrained
from qbara.tensor_checks import tensors_digest

__all__ = ["QUANT_MANIFEST", "WEIGHTS", "QUANT_METHOD", "save_quantized", "write_quantized"]

QUANT_MANIFEST = "qbara_quant.json"
# Not transformers' `model.safetensors`: a plain `from_pretrained` must fail to find weights, not load its
# random initialisation (it skips a quantization_config it does not know, with a warning).
WEIGHTS = "qbara_model.safetensors"
# transformers prints the quant_method it does not know ("Unknown quantization type, got ...; we will skip the
# quantization"), so it says what loads the folder.
QUANT_METHOD = "qbara (a qbara quantized folder: transformers cannot load it; use qbara.load_model(folder))"


def _quantization_entry() -> dict:
    """The `quantization_config` a native folder's config.json declares itself with."""
    return {"quant_method": QUANT_METHOD, "format_version": 1, "manifest": QUANT_MANIFEST, "weights": WEIGHTS,
            "load_with": "qbara.load_model(folder)  # packed qbara weights; transformers cannot load them"}


def save_quantized(model, tokenizer, out_dir, base_only: bool = False, overwrite: bool = False) -> Path:
    """Save a model whose linears are QuantizedLinear as a folder (`qbara.outputs`' swap); base_only:
    the quantized base under its adapters, without them."""
    with output_folder(out_dir, overwrite=overwrite, command="save_quantized", option="out_dir") as tmp:
        write_quantized(model, tokenizer, tmp, base_only)
    return Path(out_dir)


def write_quantized(model, tokenizer, folder, base_only: bool = False) -> Path:
    """Write the native quantized files into the (new, empty) `folder`; see `save_quantized`."""
    adapted = adapter_layers(model)
    if adapted and not base_only:
        raise QbaraError("the model still has adapters; merge them first (qbara.merge(model, into='quantized')), "
                         "or pass base_only=True to save the base without them")
    state = model.state_dict()
    layers = {n: m.quant_config.to_dict() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if adapted:
        state, layers = _without_adapters(state, layers, adapted)
    if not layers:
        raise QbaraError("the model has no quantized layers; save a dense model with save_pretrained instead")
    output = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and output is not None:
        # state_dict() detaches, so tied tensors are found by storage, not identity.
        embedding_ptr = model.get_input_embeddings().weight.data_ptr()
        state = {k: v for k, v in state.items()
                 if not (k.endswith("lm_head.weight") and v.data_ptr() == embedding_ptr)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt", "qbara": "quantized"})
    config = copy.deepcopy(model.config)
    config.quantization_config = _quantization_entry()
    config.save_pretrained(folder)
    manifest = {"format_version": 1, "layers": layers, "weights_sha256": tensors_digest(state)}
    (folder / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _without_adapters(state: dict, layers: dict, adapted: dict) -> tuple[dict, dict]:
    """State dict and layer manifest of the bases under the adapters (`name.base.x` -> `name.x`)."""
    def rename(key: str) -> str | None:
        for name in adapted:
            if key.startswith(name + "."):
                rest = key[len(name) + 1:]
                return f"{name}.{rest[len('base.'):]}" if rest.startswith("base.") else None
        return key

    new_state = {}
    for key, value in state.items():
        new_key = rename(key)
        if new_key is not None:
            new_state[new_key] = value
    new_layers = {}
    for key, value in layers.items():
        new_key = key[: -len(".base")] if key.endswith(".base") and key[: -len(".base")] in adapted else key
        new_layers[new_key] = value
    return new_state, new_layers


# ---------------------------------------------------------------- save_pretrained of a prepared model


@on_save_pretrained
def _save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
    """save_pretrained for qbara models: packed quantized base (+ adapters) that `qbara.load_model` reads."""
    parent = super(type(self), self).save_pretrained
    quantized = any(isinstance(m, QuantizedLinear) for m in self.modules())
    adapted = bool(adapter_layers(self))
    if not (quantized or adapted):
        return parent(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
    if state_dict is not None:
        raise QbaraError("save_pretrained(state_dict=...) cannot save a qbara model's packed layers; call "
                         "save_pretrained(folder) without it")
    if not is_main_process:
        return None
    if adapted and not quantized:
        raise QbaraError("this model has adapters on a dense base; save them with qbara.save_adapter(model, folder)")
    _save_native(self, save_directory)
    return None


def _save_native(model, folder) -> Path:
    """Write `model` into `folder` in place: the quantized base, and its adapters if any."""
    folder = Path(folder)
    adapted = bool(adapter_layers(model))
    write_quantized(model, None, folder, base_only=adapted)
    if adapted:
        save_adapter(model, folder, base_model_name=str(folder), fingerprint=model_fingerprint(model))
    return folder
