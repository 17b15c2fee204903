"""Run configuration for `qbara train`: YAML file plus `--section.key value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qbara.adapters.config import QLORA, QLORA_METHOD, AdapterConfig
from qbara.adapters.methods import DEFAULT_METHOD, METHODS
from qbara.errors import QbaraError
from qbara.options import option
from qbara.prompt_formats import check_template_choice
from qbara.quant.config import QuantConfig
from qbara.train.foreign_keys import UNSUPPORTED, unsupported_message
from qbara.train.fsdp import fsdp_choice
from qbara.validate import load_yaml_file, short_repr

__all__ = ["RunConfig", "build_config", "load_run_config", "parse_value", "valid_keys"]

_SEED_LIMIT = 2**32  # numpy's and torch's generators take 32-bit seeds
# Trainer optimizers (transformers' OptimizerNames) that run on CPU and GPU without an extra package.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


@dataclass
class ModelSection:
    name: str = option("smollm2-135m", "base model: a Hugging Face folder, a qbara quantized folder, a GGUF file, "
                                       "smollm2-135m / gemma3-270m (embedded) or tiny-llama (random weights)")
    dtype: str = option("auto", "storage of the weights left unquantized (auto = the checkpoint's, float32, "
                                "bfloat16, float16); compute stays fp32 on CPU")
    adapter: str = option("", "start from this adapter folder (e.g. `qbara lq`'s OUT/adapter); the adapter section "
                              "is then ignored")


@dataclass
class DataSection:
    train: str = option("", "training records: a .jsonl, .json, .csv or .txt file")
    eval: str = option("", "eval records (same formats); empty = none, or data.held_out of the train records")
    format: str = option("auto", "record format: auto (from the fields), instruction, chat or text")
    template: str = option("auto", "how instruction and chat records become prompts: auto (the tokenizer's chat "
                                   "template, else Alpaca), alpaca, chatml, llama3, gemma, or a .jinja file; recorded "
                                   "in the adapter and written to merged/exported models")
    held_out: float = option(0.0, "fraction of the train records held out for eval when data.eval is empty "
                                  "(not for text)")
    max_length: int = option(512, "tokens per example; longer records are cut at the end (one with no answer token "
                                  "left is an error)")
    on_error: str = option("fail", "a malformed record: fail (stop with its line) or skip it")
    max_records: int = option(0, "use only the first N train records; 0 = all")


@dataclass
class TrainSection:
    output_dir: str = option("runs/qbara", "where checkpoints, the adapter, the log and loss_curve.png go")
    overwrite: bool = option(False, "write into a non-empty output_dir qbara did not write (its files are kept)")
    steps: int = option(100, "optimizer steps; -1 when the run is train.epochs long")
    epochs: float = option(0.0, "> 0: train this many passes over the data instead of train.steps")
    batch_size: int = option(4, "examples per device per forward pass (also the eval batch)")
    grad_accum: int = option(1, "forward passes per optimizer step (effective batch = batch_size * grad_accum)")
    lr: float = option(2e-4, "peak learning rate")
    scheduler: str = option("constant", "learning-rate schedule (transformers' SchedulerType: constant, linear, "
                                        "cosine, ...)")
    warmup_steps: int = option(0, "steps of linear warmup; exclusive with train.warmup_ratio")
    warmup_ratio: float = option(0.0, "warmup as a fraction of the run, in [0, 1); exclusive with train.warmup_steps")
    weight_decay: float = option(0.0, "the optimizer's weight decay (decoupled for AdamW)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = none")
    optim: str = option("adamw_torch", "optimizer: " + ", ".join(OPTIMIZERS))
    report_to: str = option("none", "run tracking: none, or comma-separated tensorboard, wandb, mlflow")
    seed: int = option(0, "seed of the adapter init, data order and dropout, in [0, 2**32)")
    save_steps: int = option(50, "write a checkpoint (for --resume) every N steps")
    save_total_limit: int = option(2, "complete checkpoints kept, newest first (at least 1)")
    logging_steps: int = option(5, "log the training loss every N steps")
    eval_steps: int = option(0, "evaluate on the eval records every N steps (and once before the first); 0 = never")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, "
                                                 "slower steps")
    bf16: bool = option(False, "bfloat16 mixed precision (GPU)")
    fsdp: str = option("", "full_shard: shard the packed quantized base and the adapters across the torchrun ranks "
                           "(FSDP2); empty: each rank holds the whole model (DDP)")
    progress: bool = option(True, "show progress bars")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    quant: dict = field(default_factory=lambda: {"format": "nf4", "block_size": 64})
    adapter: dict = field(default_factory=lambda: {"method": DEFAULT_METHOD, "rank": 8, "alpha": 16})
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

# Key names from Hugging Face TrainingArguments / PEFT LoraConfig / bitsandbytes, Axolotl and LLaMA-Factory configs
# -> qbara's key. An alias works wherever a key does: under its section in YAML (`train: {learning_rate: 1e-4}`), as
# a flat top-level YAML key (`learning_rate: 1e-4`) and on the command line (`--learning_rate 1e-4`,
# `--train.learning_rate 1e-4`). Names that are already qbara's (warmup_steps, weight_decay, max_grad_norm,
# warmup_ratio, optim, seed, output_dir, bf16, save_steps, target_modules, ...) need no entry; other tools' keys
# with no qbara equivalent are refused with the reason (`qbara.train.foreign_keys`).
ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.steps",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "overwrite_output_dir": "train.overwrite",
    "r": "adapter.rank",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "pretrained_model_name_or_path": "model.name",
    "max_seq_length": "data.max_length",
    # bitsandbytes' BitsAndBytesConfig
    "bnb_4bit_quant_type": "quant.format",          # nf4 (fp4 has no qbara format)
    "bnb_4bit_use_double_quant": "quant.double_quant",
    # Axolotl
    "base_model": "model.name",
    "lora_model_dir": "model.adapter",
    "lora_r": "adapter.rank",
    "lora_target_modules": "adapter.target_modules",
    "sequence_len": "data.max_length",
    "val_set_size": "data.held_out",
    "chat_template": "data.template",
    "micro_batch_size": "train.batch_size",
    "num_epochs": "train.epochs",
    "lr_scheduler": "train.scheduler",
    "optimizer": "train.optim",
    # LLaMA-Factory
    "model_name_or_path": "model.name",
    "adapter_name_or_path": "model.adapter",
    "finetuning_type": "adapter.method",
    "lora_rank": "adapter.rank",
    "template": "data.template",
    "cutoff_len": "data.max_length",
    "val_size": "data.held_out",
    "max_samples": "data.max_records",
}

# Run trackers the HF Trainer reports to -> the package each needs. TensorBoard writes event files under
# train.output_dir/runs/<date>_<host> and works offline; wandb / mlflow follow their own settings
# (e.g. WANDB_MODE=offline).
_TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def valid_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f"{s}.{f.name}" for s, cls in _FREE_SECTIONS.items() for f in dataclasses.fields(cls)]
    return keys


def _resolve_key(key: str) -> str:
    """`key` as `section.name`: a full key, a name unique across sections, or an alias (bare or under its
    section: `learning_rate`, `train.learning_rate`). Another tool's key qbara has no equivalent for is refused
    with the reason; a did-you-mean is offered only for a name close to a real one."""
    keys = valid_keys()
    if key in keys:
        return key
    section, dot, name = key.rpartition(".")
    target = ALIASES.get(name)
    if target and (not dot or target.startswith(f"{section}.")):
        return target
    leaf_matches = [k for k in keys if k.split(".", 1)[1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if leaf_matches:
        raise QbaraError(f"config key {key!r} is ambiguous: write {' or '.join(leaf_matches)}")
    refusal = unsupported_message(key)
    if refusal:
        raise QbaraError(refusal)
    raise QbaraError(f"unknown config key {key!r}{_did_you_mean(key, keys)} (keys are section.name, e.g. train.lr, "
                     f"adapter.method; `qbara train --print-config` lists them)")


_SIMILAR = 0.75  # difflib ratio above which an unknown name is taken for a typo of a known one


def _did_you_mean(key: str, keys: list[str]) -> str:
    """'; did you mean ...?' for a key whose name is a near-miss of a key or alias (in its section, when it names
    one), else ''."""
    section, dot, name = key.rpartition(".")
    sections = {k.split(".", 1)[0] for k in keys}
    if dot and section not in sections:  # a misspelt section: compare the whole key
        close = difflib.get_close_matches(key, keys, n=1, cutoff=_SIMILAR)
        return f"; did you mean {close[0]!r}?" if close else ""
    leaves = {k.split(".", 1)[1]: k for k in keys if not dot or k.startswith(f"{section}.")}
    aliases = {a: t for a, t in ALIASES.items() if not dot or t.startswith(f"{section}.")}
    close = difflib.get_close_matches(name, list(leaves) + list(aliases), n=1, cutoff=_SIMILAR)
    if not close:
        return ""
    if close[0] in leaves:
        return f"; did you mean {leaves[close[0]] if dot else close[0]!r}?"
    return f"; did you mean {close[0]!r} (= {aliases[close[0]]})?"


def parse_value(text: str):
    """Command-line value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise QbaraError(f"command-line value {text[:20]}... is nested too deeply; write a plain value") from None


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _coerce(value, kind: type, key: str):
    """`value` as the field's type, the one typed check of every run-config field: a string is parsed (YAML
    reads 1e-4 as a string; the command line gives strings), a whole float is an int, 0 / 1 are booleans, a
    number is a name or path; an empty value (`steps:` with nothing after it), a list or mapping, a boolean for
    a number or string, and any other number for a boolean are refused naming the key."""
    if kind not in (int, float, bool, str):
        return value
    if value is None:
        raise QbaraError(f"config key {key} is empty (null): write a {kind.__name__} value or remove the key")
    try:
        if isinstance(value, str) and kind is not str:
            return _parse_text(value, kind)
        if _fits(value, kind):
            return kind(value)
    except (ValueError, OverflowError):
        pass
    raise QbaraError(f"config key {key}: {short_repr(value)} is not a valid {kind.__name__}")


def _parse_text(text: str, kind: type):
    if kind is not bool:
        return kind(text)
    if text.lower() not in _TRUE + _FALSE:
        raise ValueError(text)
    return text.lower() in _TRUE


def _fits(value, kind: type) -> bool:
    """Whether a parsed (non-string) YAML / JSON value stands for a `kind` without losing anything."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        return isinstance(value, bool) or (number and value in (0, 1))
    if kind is int:
        return number and (isinstance(value, int) or value.is_integer())
    if kind is str:
        return isinstance(value, str) or number  # a name or path that reads as a number (`output_dir: 2024`)
    return number


def _yaml_settings(data: dict):
    """(key, value) for each setting in YAML `data`: the keys of each section, prefixed with it, and flat
    top-level keys (any top-level name that is not a section, resolved like a command-line override)."""
    for top, values in (data or {}).items():
        if top not in _SECTIONS and top not in _FREE_SECTIONS:
            if isinstance(values, dict) and top not in UNSUPPORTED:
                close = difflib.get_close_matches(top, list(_SECTIONS) + list(_FREE_SECTIONS), n=1, cutoff=_SIMILAR)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise QbaraError(f"unknown config section {top!r}{hint}: "
                                 "sections are model, quant, adapter, data, train")
            yield top, values
            continue
        if top == "model" and isinstance(values, str):
            values = {"name": values}
        if top == "adapter" and isinstance(values, str):  # Axolotl's `adapter: qlora` / `adapter: lora`
            values = {"method": values}
        if not isinstance(values, dict):
            raise QbaraError(f"config section {top!r} must be a mapping of keys to values")
        for key, value in values.items():
            yield f"{top}.{key}", value


def _merge(merged: dict[str, dict], settings) -> None:
    """Put each (key, value) at its resolved merged[section][name]; two keys for one field are an error."""
    written: dict[str, str] = {}
    for key, value in settings:
        full = _resolve_key(key)
        if full in written:
            raise QbaraError(f"config keys {written[full]!r} and {key!r} both set {full}: keep one")
        written[full] = key
        section, name = full.split(".", 1)
        merged.setdefault(section, {})[name] = value


def _override_settings(overrides: dict):
    """(key, value) for each command-line override; a bare `--model NAME` is model.name (as `model: NAME` is in
    YAML), and a bare `--adapter METHOD` (lora, qlora, ... and no folder of that name) adapter.method (Axolotl's
    `adapter: qlora`); `--adapter FOLDER` stays model.adapter."""
    for key, value in overrides.items():
        if key == "model" and isinstance(value, str):
            key = "model.name"
        elif key == "adapter" and value in (*METHODS, QLORA) and not Path(value).is_dir():
            key = "adapter.method"
        yield key, value


def build_config(data: dict, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from `data` (as read from YAML: sections and/or flat keys) and flat `overrides`
    {"train.lr": 1e-4, "learning_rate": 1e-4, ...}, which win over the YAML."""
    merged: dict[str, dict] = {}
    _merge(merged, _yaml_settings(data))
    _merge(merged, _override_settings(overrides or {}))
    config = RunConfig()
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in merged.get(section, {}).items()}
        setattr(config, section, cls(**{**dataclasses.asdict(getattr(config, section)), **values}))
    if "quant" in merged:
        config.quant = dict(merged["quant"]) if "format" in merged["quant"] else {**config.quant, **merged["quant"]}
    if "adapter" in merged:
        config.adapter = {**config.adapter, **merged["adapter"]}
    if config.adapter.get("method") == QLORA:
        config.adapter = {**config.adapter, "method": _qlora_as_lora(config.quant.get("format"))}
    t = config.train
    if t.epochs > 0:  # the run is epochs long: steps must be left out (or HF's -1), and becomes -1
        if "steps" in merged.get("train", {}) and t.steps > 0:
            raise QbaraError(f"train.steps={t.steps} and train.epochs={t.epochs} (max_steps and num_train_epochs) "
                             f"both set the run length: keep one")
        t.steps = -1
    _validate(config)
    return config


def _qlora_as_lora(quant_format) -> str:
    """adapter.method qlora: QLoRA is LoRA on an NF4 base, so it trains method lora (with a note) when the quant
    is NF4, and is refused naming both fixes when it is not."""
    if quant_format != "nf4":
        raise QbaraError(f"adapter.method qlora is LoRA on an NF4 base, but quant.format is {quant_format!r}: write "
                         f"adapter.method lora to train LoRA on {quant_format}, or quant.format nf4 for QLoRA")
    print("qbara: adapter.method qlora is method lora on the NF4 base (QLoRA); training lora", file=sys.stderr)
    return QLORA_METHOD


def _validate(config: RunConfig) -> None:
    config.quant_config()
    config.adapter_config()
    d, t = config.data, config.train
    if d.format not in ("auto", "instruction", "chat", "text"):
        raise QbaraError(f"data.format {d.format!r}: choose auto, instruction, chat or text")
    check_template_choice(d.template)
    if d.on_error not in ("fail", "skip"):
        raise QbaraError(f"data.on_error {d.on_error!r}: choose fail or skip")
    if not 0.0 <= d.held_out < 1.0:
        raise QbaraError(f"data.held_out must be in [0, 1), got {d.held_out}")
    if t.epochs < 0:
        raise QbaraError(f"train.epochs must be positive (or 0 to train for train.steps), got {t.epochs}")
    if t.epochs == 0 and t.steps <= 0:
        raise QbaraError(f"train.steps must be positive (or set train.epochs), got {t.steps}")
    for key in ("batch_size", "grad_accum", "save_steps", "logging_steps"):
        if getattr(t, key) <= 0:
            raise QbaraError(f"train.{key} must be positive, got {getattr(t, key)}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise QbaraError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_ratio > 0 and t.warmup_steps > 0:
        raise QbaraError(f"train.warmup_steps={t.warmup_steps} and train.warmup_ratio={t.warmup_ratio} both set "
                         f"the warmup: keep one")
    if t.max_grad_norm < 0:
        raise QbaraError(f"train.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    t.fsdp = fsdp_choice(t.fsdp)
    trackers = [r.strip() for r in t.report_to.split(",") if r.strip()]
    unknown = [r for r in trackers if r not in _TRACKERS and r != "none"]
    if unknown or not trackers or ("none" in trackers and len(trackers) > 1):
        raise QbaraError(f"train.report_to {t.report_to!r}: write none, or one or more of {', '.join(_TRACKERS)} "
                         f"separated by commas")
    for tracker in trackers:
        if tracker != "none" and importlib.util.find_spec(_TRACKERS[tracker]) is None:
            raise QbaraError(f"train.report_to {tracker} needs its package: pip install {_TRACKERS[tracker]}")
    if t.optim not in OPTIMIZERS:
        raise QbaraError(f"train.optim {t.optim!r}: choose {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}")
    if d.max_length <= 0:
        raise QbaraError(f"data.max_length must be positive, got {d.max_length}")
    for section in (d, t):  # NaN passes every comparison above: refuse it (and infinities) here
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise QbaraError(f"{type(section).__name__.removesuffix('Section').lower()}.{f.name} must be a "
                                 f"finite number, got {value}")
    if t.lr <= 0:
        raise QbaraError(f"train.lr must be a positive learning rate (e.g. 2e-4), got {t.lr}")
    for key in ("seed", "warmup_steps", "eval_steps", "save_total_limit"):
        if getattr(t, key) < 0:
            raise QbaraError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    if t.seed >= _SEED_LIMIT:
        raise QbaraError(f"train.seed must be in [0, 2**32) (numpy and torch seeds are 32-bit), got {t.seed}")
    if t.weight_decay < 0:
        raise QbaraError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if d.max_records < 0:
        raise QbaraError(f"data.max_records must be >= 0 (0 = all), got {d.max_records}")
    schedulers = _schedulers()
    if t.scheduler not in schedulers:
        close = difflib.get_close_matches(t.scheduler, schedulers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise QbaraError(f"train.scheduler {t.scheduler!r}{hint}: choose one of {', '.join(schedulers)}")


def _schedulers() -> list[str]:
    """The learning-rate schedules the HF Trainer knows (transformers' SchedulerType)."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


def load_run_config(path: str | None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML (or JSON) run config and apply overrides."""
    data = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise QbaraError(f"config file {path!r} not found; pass --config with an existing YAML file")
        data = load_yaml_file(p, "run config") or {}  # a regular UTF-8 file, no aliases, bounded nesting
        if not isinstance(data, dict):
            raise QbaraError(f"{path}: the top level must be a mapping of sections (model, quant, adapter, data, "
                             f"train)")
    return build_config(data, overrides)
