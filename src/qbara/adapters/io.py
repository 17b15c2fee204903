"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`, plus `qbara_adapter.json`.

Tensor names follow PEFT (`base_model.model.<layer>.lora_A.weight`, ...). qbara's record (method, per-layer shapes
and pooling, base quantization and fingerprint, the tensors' SHA-256) is `qbara_adapter.json`, with a copy in the
safetensors header: a record that differs from it was edited and is refused. A chat template on the model's state
is saved as `chat_template.jinja` and put back on load. No pickle is read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qbara.adapters.attach import adapter_layers
from qbara.adapters.base import AdaptedLinear
from qbara.adapters.config import AdapterConfig
from qbara.adapters.methods import build_adapter
from qbara.adapters.peft_import import peft_record
from qbara.adapters.peft_layout import PREFIX
from qbara.atomic import save_safetensors_atomic, write_bytes_atomic, write_json_atomic
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.nn.bnb import adopt_bnb, bnb_layers
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.prompt_formats import read_template_file
from qbara.quant.config import QuantConfig
from qbara.state import enable_native_save, state_of
from qbara.targets import set_submodule
from qbara.tensor_checks import (
    ADAPTER_LIMIT,
    check_digest,
    check_tensor,
    read_safetensors,
    safetensors_metadata,
    tensors_digest,
)
from qbara.validate import read_json_file, safetensors_shapes

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_adapter", "load_adapter", "read_adapter_config", "read_chat_template",
           "check_base_fingerprint", "adapter_base_quant", "copy_adapter_weights"]

CONFIG_NAME = "adapter_config.json"
_QBARA_NAME = "qbara_adapter.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TEMPLATE_NAME = "chat_template.jinja"  # the Jinja text the training prompts were rendered with
_FORMAT_VERSION = 1
_RECORD_KEY = "qbara_record"  # adapter_model.safetensors metadata: the record as saved


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the unquantized base, recorded by `prepare` (or computed now)."""
    recorded = state_of(model).base_fingerprint
    if recorded:
        return recorded
    return model_fingerprint(model)


def save_adapter(model: nn.Module, directory, base_model_name: str | None = None,
                 fingerprint: str | None = None) -> Path:
    """Write the model's adapters to `directory` (created; each file atomically). base_model_name: PEFT's
    base_model_name_or_path (default: the model's name_or_path); fingerprint: the base recorded (default: the
    unquantized model `prepare` saw)."""
    layers = adapter_layers(model)
    if not layers:
        raise QbaraError("this model has no adapters to save; attach them with qbara.prepare(..., adapter=...)")
    config: AdapterConfig | None = state_of(model).adapter_config
    if config is None:
        raise QbaraError("this model's adapters were not attached by qbara.prepare / attach_adapters")
    tensors, records = {}, {}
    for name, layer in layers.items():
        for pname, param in layer.adapter_parameters().items():
            tensors[f"{PREFIX}{name}.{pname}"] = param
        quant = layer.quant_config
        records[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                         "pool_in": layer.pool_in, "pool_out": layer.pool_out,
                         "quant": quant.to_dict() if quant is not None else None}
    data = {
        **config.method_spec.peft_fields(layers, config.alpha),  # peft_type, lora_alpha, QA-LoRA's layout
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_dropout": config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": _peft_targets(model, list(layers)),
        "base_model_name_or_path": peft_base_name(base_model_name or getattr(model, "name_or_path", None)),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    record = {"format_version": _FORMAT_VERSION, "adapter": config.to_dict(),
              "base_fingerprint": fingerprint or base_fingerprint(model), "layers": records,
              "weights_sha256": tensors_digest(tensors)}
    directory = Path(directory)
    metadata = {"format": "pt", "qbara": config.method, _RECORD_KEY: _canonical(record)}
    save_safetensors_atomic(tensors, directory / WEIGHTS_NAME, metadata=metadata)
    if state_of(model).chat_template is not None:
        write_bytes_atomic(directory / _TEMPLATE_NAME, state_of(model).chat_template.encode("utf-8"))
    write_json_atomic(directory / _QBARA_NAME, record)
    write_json_atomic(directory / CONFIG_NAME, data)
    return directory


def read_chat_template(directory) -> str | None:
    """The adapter folder's chat_template.jinja (the template training rendered with), compiled in the sandbox;
    None when it has none."""
    path = Path(directory) / _TEMPLATE_NAME
    if not os.path.lexists(path):
        return None
    return read_template_file(path, "recorded chat template",
                              fix="the adapter folder's chat template is damaged: restore it, or delete it to keep "
                                  "the base tokenizer's")


def _peft_targets(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT's target_modules: the layers' last name components when those select exactly them, else full names."""
    suffixes = {n.rsplit(".", 1)[-1] for n in adapted}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = tuple(f"{n}." for n in adapted)
    selected = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, QuantizedLinear, AdaptedLinear)) and m is not output
                and not n.startswith(inside) and n.rsplit(".", 1)[-1] in suffixes]
    return sorted(suffixes) if sorted(selected) == sorted(adapted) else sorted(adapted)


def peft_base_name(name: str | None) -> str | None:
    """A base_model_name_or_path PEFT can load: a local folder as its absolute path; None for a tiny-* model."""
    if not name:
        return None
    if name.strip().lower().startswith("tiny-"):
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def read_adapter_config(directory, peft: bool = False) -> dict:
    """The adapter folder's adapter_config.json with qbara's record under "qbara"; peft=True also accepts a
    folder PEFT wrote ("qbara": None)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise QbaraError(f"adapter folder {str(directory)!r} does not exist; pass the folder save_adapter wrote")
    if not path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise QbaraError(f"{str(directory)!r} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = _read_json(path)
    if os.path.lexists(directory / _QBARA_NAME):  # a folder, a fifo or a link to /dev/null is refused, not skipped
        data["qbara"] = _read_json(directory / _QBARA_NAME)
    elif "qbara" not in data and peft and "peft_type" in data:
        _refuse_missing_record(directory)
        data["qbara"] = None
        return data
    elif "qbara" not in data:
        raise QbaraError(f"{str(directory)!r}: no {_QBARA_NAME}, so not an adapter qbara wrote (a PEFT adapter?); "
                         f"qbara loads adapters it saved")
    if not isinstance(data["qbara"], dict) or not isinstance(data["qbara"].get("adapter"), dict):
        raise QbaraError(f"{directory / _QBARA_NAME}: no 'adapter' record; the file is damaged, save the adapter again")
    _check_adapter_record(directory / _QBARA_NAME, data["qbara"])
    return data


def _refuse_missing_record(directory: Path) -> None:
    """Refuse reading a qbara folder that lost its qbara_adapter.json as a PEFT one (it would skip the checks)."""
    if _RECORD_KEY in safetensors_metadata(directory / WEIGHTS_NAME, "adapter weights"):
        raise QbaraError(f"{directory / _QBARA_NAME} is missing: the folder's {WEIGHTS_NAME} was saved by qbara with "
                         f"that record; restore the file or save the adapter again")


def _canonical(value) -> str:
    """A JSON value as one text, the same for equal values."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_record_against_weights(directory, record: dict) -> None:
    """The record's sizes fit the weights file's header, and it is the record saved with them."""
    _check_adapter_sizes(Path(directory) / WEIGHTS_NAME, AdapterConfig.from_dict(record["adapter"]), record["layers"])
    if not record.get("peft"):
        _check_record_as_saved(directory, record)


def _check_adapter_sizes(weights, config: AdapterConfig, records: dict) -> None:
    """Refuse a config whose sizes differ from the weights file's header, before anything is allocated."""
    shapes = safetensors_shapes(weights, "adapter weights file")
    held = {key: math.prod(shape) for key, shape in shapes.items()}
    for name, record in records.items():
        if record["in_features"] % record["pool_in"] or record["out_features"] % record["pool_out"]:
            continue  # the layer refuses these pooling factors itself, with the reason
        expected = config.method_spec.parameter_count(config, record)
        found = sum(size for key, size in held.items() if key.startswith(f"{PREFIX}{name}."))
        if found != expected:
            raise QbaraError(f"{weights}: layer {name!r}: its tensor shapes hold {found:,} values but the adapter "
                             f"config (method {config.method}, rank {config.rank}) needs {expected:,}; the config "
                             f"and the weights do not belong together, save the adapter again")


def _check_record_as_saved(directory, record: dict) -> None:
    """Refuse a record that differs from its copy in the safetensors header (none there: passes)."""
    weights = Path(directory) / WEIGHTS_NAME
    saved = safetensors_metadata(weights, "adapter weights").get(_RECORD_KEY)
    if saved is None or _canonical(record) == saved:
        return
    where = Path(directory) / (_QBARA_NAME if os.path.lexists(Path(directory) / _QBARA_NAME) else CONFIG_NAME)
    try:
        original = json.loads(saved)
    except ValueError:
        original = None
    if not isinstance(original, dict):
        raise QbaraError(f"{weights}: its header's {_RECORD_KEY} is not the JSON record save_adapter writes; the file "
                         f"is damaged, save the adapter again")
    entry, now, then = _first_difference(record, original)
    raise QbaraError(f"{where}: {entry} is {now!r}, but the adapter was saved with {then!r} (the record kept in "
                     f"{WEIGHTS_NAME}); the file was edited after saving — restore it, or save the adapter again")


def _first_difference(now, then, path: str = "", depth: int = 3):
    """(dotted path, now, saved) of the first entry where two JSON values differ, down to `depth` levels."""
    if depth and isinstance(now, dict) and isinstance(then, dict):
        for key in sorted(set(now) | set(then)):
            if key not in now or key not in then or _canonical(now[key]) != _canonical(then[key]):
                return _first_difference(now.get(key), then.get(key), f"{path}.{key}".lstrip("."), depth - 1)
    return path or "the record", now, then


def _check_adapter_record(path, record: dict) -> None:
    """Check that the record's `adapter` and per-layer `quant` build valid configs."""
    try:
        AdapterConfig.from_dict(record["adapter"])
        layers = record.get("layers")
        for name, layer in (layers.items() if isinstance(layers, dict) else ()):
            if isinstance(layer, dict) and isinstance(layer.get("quant"), dict):
                QuantConfig.from_dict(layer["quant"])
    except (QbaraError, TypeError) as err:
        raise QbaraError(f"{path}: {err}; the file is damaged, save the adapter again") from None


def _read_json(path: Path) -> dict:
    """A JSON object of the adapter folder, checked."""
    return read_json_file(path, path.name, fix="the file is damaged, save the adapter again")


def check_base_fingerprint(info: dict, model: nn.Module, what: str, fix: str, required: bool = False) -> None:
    """Refuse `model` when its fingerprint differs from the one `info` records (none recorded: passes unless
    `required`)."""
    expected, actual = info.get("base_fingerprint"), base_fingerprint(model)
    if (expected or required) and expected != actual:
        raise QbaraError(f"{what} was trained on a different base model (fingerprint {expected}, this model "
                         f"{actual}); {fix}")


def adapter_base_quant(directory) -> dict[str, QuantConfig] | None:
    """Layer name -> the QuantConfig the adapter's base had, to quantize a dense base on load; None when that base
    was not a plain quantization (LoftQ / LQ, dense layers)."""
    info = read_adapter_config(directory, peft=True)["qbara"]
    if info is None:  # a PEFT adapter: trained on the dense model as far as anyone knows
        return None
    _check_layer_records(info.get("layers"), directory)
    _check_record_against_weights(directory, info)  # before the base is quantized as the record says
    if AdapterConfig.from_dict(info["adapter"]).init != "default":
        return None
    records = info["layers"]
    if any(r.get("quant") is None for r in records.values()):
        return None
    return {name: QuantConfig.from_dict(r["quant"]) for name, r in records.items()}


def _check_layer_records(records, directory) -> None:
    """The `layers` section: a non-empty mapping of layer name to its record, with whole-number sizes."""
    where = f"{Path(directory) / _QBARA_NAME}"
    if not isinstance(records, dict) or not records:
        raise QbaraError(f"{where}: 'qbara.layers' lists no adapted layers; the adapter would change nothing — "
                         f"the file is damaged, save the adapter again")
    for name, record in records.items():
        if not isinstance(record, dict):
            raise QbaraError(f"{where}: layer {name!r} has no record; save the adapter again")
        for key in ("in_features", "out_features", "pool_in", "pool_out"):
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise QbaraError(f"{where}: layer {name!r} {key} must be a positive whole number, got {value!r}")
        if "quant" not in record:
            raise QbaraError(f"{where}: layer {name!r} has no 'quant' entry (how its base layer was quantized, null "
                             f"for a dense one); the file is damaged, save the adapter again")
        if record["quant"] is not None and not isinstance(record["quant"], dict):
            raise QbaraError(f"{where}: layer {name!r} quant must be a mapping or null, got {record['quant']!r}")


def _check_layer_quant(directory, name: str, recorded: dict | None, base: nn.Module) -> None:
    """Refuse base layer `name` when its quantization (or none) differs from what the adapter was trained on."""
    actual = base.quant_config if isinstance(base, QuantizedLinear) else None
    expected = QuantConfig.from_dict(recorded) if recorded is not None else None
    if expected == actual:
        return
    raise QbaraError(f"{name}: the adapter in {str(directory)!r} was trained on this layer {_quant_label(expected)}, "
                     f"but this base has it {_quant_label(actual)}; load the base it was trained on — the dense "
                     f"model, which is quantized on load as the adapter records (qbara.from_pretrained(model, "
                     f"adapter=folder), or --adapter on the CLI), or the quantized base saved with it")


def _quant_label(quant: QuantConfig | None) -> str:
    return "dense (not quantized)" if quant is None else f"quantized as {quant.label}"


@torch.no_grad()
def copy_adapter_weights(layers: dict, directory) -> None:
    """Copy the tensors of `directory`'s adapter_model.safetensors into the layers' adapter parameters."""
    path = Path(directory) / WEIGHTS_NAME
    state = read_safetensors(path)
    record = read_adapter_config(directory, peft=True)["qbara"]
    check_digest(state, (record or {}).get("weights_sha256"), path, _QBARA_NAME)
    expected = set()
    for name, layer in layers.items():
        for pname, param in layer.adapter_parameters().items():
            key = f"{PREFIX}{name}.{pname}"
            expected.add(key)
            if key not in state:
                raise QbaraError(f"{WEIGHTS_NAME} lacks {key}; the adapter folder is incomplete, save it again")
            check_tensor(state[key], f"{path}: {key}", shape=param.shape, limit=ADAPTER_LIMIT)
            _check_exact_dtype(state[key].dtype, param.dtype, f"{path}: {key}")
            param.copy_(state[key])
    extra = sorted(set(state) - expected)
    if extra:
        raise QbaraError(f"{path} holds tensors its adapter_config.json does not describe ({extra[:3]}); the "
                         f"folder mixes two adapters, save it again")


# float dtype -> the parameter dtypes it converts into exactly (every value kept, bit for bit)
_EXACT_WIDENING = {torch.float16: {torch.float32, torch.float64}, torch.bfloat16: {torch.float32, torch.float64},
                  torch.float32: {torch.float64}}


def _check_exact_dtype(stored: torch.dtype, wanted: torch.dtype, what: str) -> None:
    """Refuse a stored dtype that would round into the `wanted` parameter dtype (exact widenings pass)."""
    if stored == wanted or wanted in _EXACT_WIDENING.get(stored, ()):
        return
    narrower = [str(d).removeprefix("torch.") for d, wider in _EXACT_WIDENING.items() if wanted in wider]
    also = f" (or {' / '.join(narrower)}, widened exactly)" if narrower else ""
    raise QbaraError(f"{what}: dtype {stored}, but the adapter parameter is {wanted} and {stored} does not convert "
                     f"to it exactly; save the adapter in {wanted}{also}")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise QbaraError(f"adapter layer {name!r} does not exist in this model; load the base model "
                         f"the adapter was trained on") from None


def load_adapter(model: nn.Module, directory, check_base: bool = True) -> nn.Module:
    """Attach the adapters saved in `directory` to `model` (in place), quantizing a dense base as recorded;
    refuses a base with another fingerprint unless check_base=False."""
    data = read_adapter_config(directory, peft=True)
    chat_template = read_chat_template(directory)
    info = data["qbara"]
    if info is None:  # written by PEFT: its LoRA read into qbara's record; nothing says which base it fits
        with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as reader:
            keys = list(reader.keys())
        info = peft_record(data, keys, model, directory)
        warnings.warn(f"{directory}: a PEFT LoRA adapter records no fingerprint of its base model, so qbara cannot "
                      f"check that this is the model it was trained on, nor how that was quantized (if it was, "
                      f"quantize this one the same way: quant= in qbara.from_pretrained, --quant on the CLI)",
                      stacklevel=2)
    config = AdapterConfig.from_dict(info["adapter"])
    _check_layer_records(info.get("layers"), directory)
    _check_record_against_weights(directory, info)  # before allocating
    if bnb_layers(model):  # a bitsandbytes NF4 base: taken over exactly, if the adapter was trained on that
        recorded = {json.dumps(r["quant"], sort_keys=True) for r in info["layers"].values()}
        only = json.loads(recorded.pop()) if len(recorded) == 1 else None
        adopt_bnb(model, QuantConfig.from_dict(only) if only else None)
    if config.init != "default":
        dense = [n for n in info["layers"] if not isinstance(_submodule(model, n), QuantizedLinear)]
        if dense:
            raise QbaraError(f"adapter in {str(directory)!r} starts from an {config.init!r} decomposition: its "
                             f"base is the Q of W ≈ Q + L1 L2, not a quantization of the dense weights "
                             f"({dense[0]} is dense here); load the quantized base saved with it (`qbara lq` "
                             f"writes OUT/model, `qbara train` writes OUTPUT/base)")
    if check_base:
        check_base_fingerprint(info, model, f"adapter in {str(directory)!r}",
                               f"base named {data.get('base_model_name_or_path')!r}; load that base model first")
    if adapter_layers(model):
        raise QbaraError("this model already has adapters; load the adapter onto a fresh base model")
    if state_of(model).base_fingerprint is None:
        state_of(model).base_fingerprint = base_fingerprint(model)
    layers = {}
    for name, record in info["layers"].items():
        base = _submodule(model, name)
        if (base.in_features, base.out_features) != (record["in_features"], record["out_features"]):
            raise QbaraError(f"{name}: adapter shape {record['out_features']}x{record['in_features']} does not "
                             f"fit the layer {base.out_features}x{base.in_features}; wrong base model")
        if record["quant"] is not None and not isinstance(base, QuantizedLinear):
            base = QuantizedLinear.from_linear(base, QuantConfig.from_dict(record["quant"]), name=name)
        elif not info.get("peft"):  # PEFT records no quantization to compare
            _check_layer_quant(directory, name, record["quant"], base)
        layer_config = dataclasses.replace(config, pool_in=record["pool_in"], pool_out=record["pool_out"])
        layers[name] = build_adapter(base, layer_config, name)
    copy_adapter_weights(layers, directory)
    with torch.no_grad():
        for name, factor in info.get("a_scale", {}).items():  # PEFT's per-layer scalings (peft_import)
            layers[name].lora_A.weight.mul_(factor)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)
    state_of(model).adapter_config = config
    if chat_template is not None:
        state_of(model).chat_template = chat_template
    return enable_native_save(model)
