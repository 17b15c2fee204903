"""Reading qbara's native quantized checkpoint (written by `qbara.native`) without a dense intermediate."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qbara.adapters.io import CONFIG_NAME, load_adapter
from qbara.errors import QbaraError
from qbara.models.files import LOAD_ERRORS, load_config, load_tokenizer, one_line
from qbara.native import QUANT_MANIFEST, QUANT_METHOD, WEIGHTS
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import QuantizedTensor
from qbara.state import enable_native_save
from qbara.targets import set_submodule
from qbara.tensor_checks import check_digest, check_tensor, read_safetensors
from qbara.validate import check_hf_folder, read_json_file

__all__ = ["is_quantized_folder"]


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


def load_quantized(path, dtype=torch.float32):
    """(model, tokenizer) from a `save_quantized` folder: a weightless skeleton filled with the
    tensors read (each checked), so memory ≈ the quantized model. `dtype` applies to the unpacked weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / QUANT_MANIFEST).is_file():
        raise QbaraError(f"{path}: config.json declares a qbara quantized folder but {QUANT_MANIFEST} is missing; "
                         f"the folder is incomplete, save it again")
    layers, recorded = _read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise QbaraError(f"{path}: {WEIGHTS} is missing; the folder is incomplete, save it again")
    check_hf_folder(path, weights=[weights])  # no custom code; config sizes bounded by the weights' size
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # qbara's own entry: the model is built plain, then its layers replaced
    state = read_safetensors(weights)
    check_digest(state, recorded, weights, QUANT_MANIFEST)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"{path / 'config.json'}: cannot build the model it describes ({one_line(exc)}); the "
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
    if os.path.lexists(path / "tokenizer_config.json"):  # a folder or a device there: refused, not skipped
        tokenizer = load_tokenizer(path)

    if (path / CONFIG_NAME).is_file():  # saved with its adapters (save_pretrained of a prepared model)
        load_adapter(model, path)
        model.eval()
    return model, tokenizer


def buffer_layout(quant: QuantConfig, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Name -> a meta tensor of the shape and dtype of each packed buffer a `shape` weight gets under `quant`."""
    return quant.family.buffer_layout(quant, shape)


def _read_manifest(path: Path) -> tuple[dict, str | None]:
    """The `layers` of qbara_quant.json and the recorded weights SHA-256 (None once a user deleted it)."""
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
