"""qbara's native quantized checkpoint: an HF folder whose quantized linears keep their packed buffers.

Files: `config.json` (the HF config), `model.safetensors` (parameters and packed buffers),
`qbara_quant.json` (layer name -> QuantConfig) and the tokenizer files. Written into a temporary
folder and swapped into place (`qbara.outputs`), so an interrupted save never leaves a half folder.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import QuantizedTensor, quantize
from qbara.targets import set_submodule
from qbara.tensor_checks import check_digest, check_tensor, read_safetensors, tensors_digest

QUANT_MANIFEST = "qbara_quant.json"
# Not transformers' `model.safetensors`: a plain `from_pretrained` must fail to find weights, not load its
# random initialisation (it skips a quantization_config it does not know, with a warning).
WEIGHTS = "qbara_model.safetensors"
LEGACY_WEIGHTS = "model.safetensors"  # folders of qbara <= 0.1 (still read)
QUANT_METHOD = "qbara"


def quantization_entry() -> dict:
    """The `quantization_config` a native folder's config.json declares itself with."""
    return {"quant_method": QUANT_METHOD, "format_version": 1, "manifest": QUANT_MANIFEST, "weights": WEIGHTS,
            "load_with": "qbara.load_model(folder)  # packed qbara weights; transformers cannot load them"}


def is_quantized_folder(path) -> bool:
    """A folder qbara wrote with packed quantized layers: by its manifest or its config.json entry."""
    path = Path(path)
    if (path / QUANT_MANIFEST).is_file():
        return True
    try:
        config_path = path / "config.json"
        if not config_path.is_file() or config_path.stat().st_size > (64 << 20):
            return False  # a device or a huge file is not read here; the loader refuses it with the reason
        config = json.loads(config_path.read_text(errors="replace"))
    except (OSError, ValueError, RecursionError):
        return False  # not ours; the loader's checks give the reason
    entry = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(entry, dict) and entry.get("quant_method") == QUANT_METHOD


def save_quantized(model, tokenizer, out_dir, base_only: bool = False, overwrite: bool = False) -> Path:
    """Save a model whose linears are QuantizedLinear (e.g. after merge(into='quantized')) as a folder.

    base_only=True saves the quantized base under a model's adapters (without them; save those with
    `save_adapter`), e.g. the Q of an LQ-LoRA / LoftQ decomposition the adapters start from. The folder
    follows `qbara.outputs`' rule: built beside and swapped in; a non-empty folder qbara did not write is
    refused unless overwrite=True (the files there are kept).
    """
    from qbara.outputs import output_folder

    with output_folder(out_dir, overwrite=overwrite, command="save_quantized", option="out_dir") as tmp:
        write_quantized(model, tokenizer, tmp, base_only)
    return Path(out_dir)


def write_quantized(model, tokenizer, folder, base_only: bool = False) -> Path:
    """Write the native quantized files into the (new, empty) `folder`; see `save_quantized`."""
    from qbara.adapters.attach import adapter_layers

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
    config.quantization_config = quantization_entry()
    config.save_pretrained(folder)
    manifest = {"format_version": 1, "layers": layers, "weights_sha256": tensors_digest(state)}
    (folder / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _without_adapters(state: dict, layers: dict, adapted: dict) -> tuple[dict, dict]:
    """State dict and layer manifest of the bases under the adapters: `name.base.x` -> `name.x`, adapter
    parameters dropped."""
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


def load_quantized(path, dtype=torch.float32):
    """(model, tokenizer) from a folder written by `save_quantized`; every tensor checked before use.

    The model is built without weights and its tensors are the ones read from the file (no dense
    intermediate): memory ≈ the quantized model. `dtype` applies to the weights that are not packed.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / QUANT_MANIFEST).is_file():
        raise QbaraError(f"{path}: config.json declares a qbara quantized folder but {QUANT_MANIFEST} is missing; "
                         f"the folder is incomplete, save it again")
    from qbara.models.loader import LOAD_ERRORS, _one_line
    from qbara.validate import check_hf_folder

    layers, recorded = _read_manifest(path)
    weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / LEGACY_WEIGHTS
    if not weights.is_file():
        raise QbaraError(f"{path}: {WEIGHTS} is missing; the folder is incomplete, save it again")
    check_hf_folder(path, weights=[weights])  # no custom code; config sizes bounded by the weights' size
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"{path / 'config.json'}: not a config transformers can read ({_one_line(exc)}); the "
                         f"folder is damaged, save it again") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # qbara's own entry: the model is built plain, then its layers replaced
    state = read_safetensors(weights)
    check_digest(state, recorded, weights, QUANT_MANIFEST)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"{path / 'config.json'}: cannot build the model it describes ({_one_line(exc)}); the "
                         f"folder is damaged, save it again") from None
    missing = []
    for name, data in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear):
            raise QbaraError(f"{path / QUANT_MANIFEST}: layer {name!r} is not a linear layer of the model its "
                             f"config.json describes; the folder is damaged, save it again") from None
        try:
            quant = QuantConfig.from_dict(data)
            shape = tuple(linear.weight.shape)
            quant.check_shape(shape, name)
            layout = buffer_layout(quant, shape)
        except (QbaraError, TypeError) as err:
            raise QbaraError(f"{path / QUANT_MANIFEST}: layer {name!r}: {err}; the folder is damaged, save it "
                             f"again") from None
        packed = {}
        for buffer, reference in layout.items():
            key = f"{name}.{buffer}"
            if key not in state:
                missing.append(key)
                continue
            check_tensor(state[key], f"{weights}: {key}", shape=reference.shape, dtype=reference.dtype,
                         floating=False)
            packed[buffer] = state.pop(key)
        bias = state.pop(f"{name}.bias", None)
        if bias is not None:
            check_tensor(bias, f"{weights}: {name}.bias", shape=(shape[0],))
        if len(packed) == len(layout):
            set_submodule(model, name, QuantizedLinear(QuantizedTensor(quant, shape, packed), bias))
    reference = model.state_dict()
    for key in list(state):
        if key in reference:
            check_tensor(state[key], f"{weights}: {key}", shape=reference[key].shape)
            state[key] = state[key].to(dtype)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    missing += [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        raise QbaraError(f"{path}: checkpoint does not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the folder is damaged, save it again")
    enable_native_save(model)
    model.requires_grad_(False)
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from qbara.models.loader import load_tokenizer

        tokenizer = load_tokenizer(path)
    from qbara.adapters.io import CONFIG_NAME, load_adapter

    if (path / CONFIG_NAME).is_file():  # saved with its adapters (save_pretrained of a prepared model)
        load_adapter(model, path)
        model.eval()
    return model, tokenizer


@functools.lru_cache(maxsize=64)
def buffer_layout(quant: QuantConfig, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Name -> an empty tensor of the shape and dtype of each packed buffer a `shape` weight gets under `quant`
    (found by quantizing zeros once per distinct layer shape: a model has a handful)."""
    return {name: torch.empty(t.shape, dtype=t.dtype)
            for name, t in quantize(torch.zeros(shape), quant, "layout").tensors.items()}


def _read_manifest(path: Path) -> tuple[dict, str | None]:
    """The `layers` of qbara_quant.json (a non-empty mapping of layer name to QuantConfig dict) and the
    weights' recorded SHA-256 (None in folders of older versions)."""
    from qbara.validate import read_json_file

    where = path / QUANT_MANIFEST
    manifest = read_json_file(where, QUANT_MANIFEST, fix="the folder is damaged, save it again")
    if manifest.get("format_version", 1) != 1:
        raise QbaraError(f"{where}: format_version {manifest.get('format_version')!r} is not one this qbara "
                         f"reads (1); upgrade qbara or save the folder again")
    recorded = manifest.get("weights_sha256")
    if recorded is not None and not isinstance(recorded, str):
        raise QbaraError(f"{where}: weights_sha256 must be a hex string, got {type(recorded).__name__}; the "
                         f"folder is damaged, save it again")
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not layers or not all(isinstance(v, dict) for v in layers.values()):
        raise QbaraError(f"{where}: 'layers' must map each quantized layer to its config and name at least one; "
                         f"the folder is damaged, save it again")
    return layers, recorded


# ---------------------------------------------------------------- save_pretrained of a prepared model

_NATIVE_CLASSES: dict[type, type] = {}


def enable_native_save(model):
    """Make `model.save_pretrained` (and so HF `Trainer.save_model`) write qbara's native format while the
    model holds quantized layers or adapters; a plain model saves as transformers does. Swaps the model's
    class for a same-named subclass (kept by deepcopy); returns the model."""
    cls = type(model)
    if getattr(cls, "_qbara_native_save", False) or not hasattr(cls, "save_pretrained"):
        return model
    if cls not in _NATIVE_CLASSES:
        _NATIVE_CLASSES[cls] = type(cls.__name__, (cls,), {"save_pretrained": _save_pretrained,
                                                          "_qbara_native_save": True,
                                                          "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})
    model.__class__ = _NATIVE_CLASSES[cls]
    return model


def _save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
    """save_pretrained for qbara models: packed quantized base (+ adapters) that `qbara.load_model` reads."""
    from qbara.adapters.attach import adapter_layers

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
    save_native(self, save_directory)
    return None


def save_native(model, folder) -> Path:
    """Write `model` into `folder` in place: the quantized base, and its adapters (recorded against that base)
    when it has some. `qbara.load_model(folder)` loads both back."""
    from qbara.adapters.attach import adapter_layers
    from qbara.adapters.io import save_adapter
    from qbara.fingerprint import model_fingerprint

    folder = Path(folder)
    adapted = bool(adapter_layers(model))
    write_quantized(model, None, folder, base_only=adapted)
    if adapted:
        save_adapter(model, folder, base_model_name=str(folder), fingerprint=model_fingerprint(model))
    return folder
