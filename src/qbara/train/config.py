"""Run configuration for `qbara train`: YAML file plus `--section.key value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qbara.adapters.config import AdapterConfig
from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig


@dataclass
class ModelSection:
    name: str = "smollm2-135m"
    dtype: str = "float32"
    adapter: str = ""  # start from this adapter folder (e.g. `qbara lq`'s OUT/adapter); the adapter section is then ignored


@dataclass
class DataSection:
    train: str = ""
    eval: str = ""
    format: str = "auto"          # auto | instruction | chat | text
    held_out: float = 0.0         # fraction of train records held out for eval when `eval` is empty
    max_length: int = 512
    on_error: str = "fail"        # fail | skip (malformed records)
    max_records: int = 0          # 0 = all


@dataclass
class TrainSection:
    output_dir: str = "runs/qbara"
    overwrite: bool = False       # write into a non-empty output_dir qbara did not write (its files are kept)
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    eval_steps: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    quant: dict = field(default_factory=lambda: {"format": "nf4", "block_size": 64})
    adapter: dict = field(default_factory=lambda: {"method": "lora", "rank": 8, "alpha": 16})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.quant)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.from_dict(self.adapter)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}
_FREE_SECTIONS = {"quant": QuantConfig, "adapter": AdapterConfig}


def valid_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f"{s}.{f.name}" for s, cls in _FREE_SECTIONS.items() for f in dataclasses.fields(cls)]
    return keys


def _resolve_key(key: str) -> str:
    keys = valid_keys()
    if key in keys:
        return key
    leaf_matches = [k for k in keys if k.split(".", 1)[1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    close = difflib.get_close_matches(key, keys + [k.split(".", 1)[1] for k in keys], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise QbaraError(f"unknown config key {key!r}{hint} (keys are section.name, e.g. train.lr, adapter.method)")


def parse_value(text: str):
    """Command-line value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(value, kind: type, key: str):
    """`value` as the field's type (YAML reads 1e-4 as a string; the command line gives strings)."""
    if kind not in (int, float, bool, str) or value is None:
        return value
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise QbaraError(f"config key {key}: {value!r} is not a valid {kind.__name__}") from None


def build_config(data: dict, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from nested `data` (as read from YAML) and flat `overrides` {"train.lr": 1e-4, ...}."""
    merged: dict[str, dict] = {}
    for section, values in (data or {}).items():
        if section not in _SECTIONS and section not in _FREE_SECTIONS:
            close = difflib.get_close_matches(section, list(_SECTIONS) + list(_FREE_SECTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise QbaraError(f"unknown config section {section!r}{hint}: sections are model, quant, adapter, data, train")
        if section == "model" and isinstance(values, str):
            values = {"name": values}
        if not isinstance(values, dict):
            raise QbaraError(f"config section {section!r} must be a mapping of keys to values")
        for key, value in values.items():
            merged.setdefault(section, {})[_resolve_key(f"{section}.{key}").split(".", 1)[1]] = value
    for key, value in (overrides or {}).items():
        section, name = _resolve_key(key).split(".", 1)
        merged.setdefault(section, {})[name] = value
    config = RunConfig()
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in merged.get(section, {}).items()}
        setattr(config, section, cls(**{**dataclasses.asdict(getattr(config, section)), **values}))
    if "quant" in merged:
        config.quant = dict(merged["quant"]) if "format" in merged["quant"] else {**config.quant, **merged["quant"]}
    if "adapter" in merged:
        config.adapter = {**config.adapter, **merged["adapter"]}
    _validate(config)
    return config


def _validate(config: RunConfig) -> None:
    config.quant_config()
    config.adapter_config()
    d, t = config.data, config.train
    if d.format not in ("auto", "instruction", "chat", "text"):
        raise QbaraError(f"data.format {d.format!r}: choose auto, instruction, chat or text")
    if d.on_error not in ("fail", "skip"):
        raise QbaraError(f"data.on_error {d.on_error!r}: choose fail or skip")
    if not 0.0 <= d.held_out < 1.0:
        raise QbaraError(f"data.held_out must be in [0, 1), got {d.held_out}")
    for key in ("steps", "batch_size", "grad_accum", "save_steps", "logging_steps"):
        if getattr(t, key) <= 0:
            raise QbaraError(f"train.{key} must be positive, got {getattr(t, key)}")
    if d.max_length <= 0:
        raise QbaraError(f"data.max_length must be positive, got {d.max_length}")


def load_run_config(path: str | None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML (or JSON) run config and apply overrides."""
    data = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise QbaraError(f"config file {path!r} not found; pass --config with an existing YAML file")
        import yaml

        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise QbaraError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise QbaraError(f"{path}: the top level must be a mapping of sections (model, quant, adapter, data, train)")
    return build_config(data, overrides)
