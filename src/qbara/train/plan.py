"""`qbara train --dry-run`: the resolved run config, the statistics of its data and the plan of the run, from
the configs, the tokenizer and the data alone: no weights are loaded and nothing is written.

The model is built on the meta device from its config (no memory behind its weights), its quantized linears
marked with their QuantConfig, and the run's adapters attached to it by qbara's own builders, so the
trainable parameter count is the one `prepare` gives the real model.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qbara.adapters.attach import attach_adapters, trainable_parameter_count
from qbara.adapters.io import WEIGHTS_NAME
from qbara.models.loader import load_model_config
from qbara.models.quantized_io import _read_manifest, is_quantized_folder
from qbara.models.streaming import empty_model
from qbara.pretrained import base_quant_for
from qbara.quant.config import QuantConfig
from qbara.targets import ALL_LINEAR, layer_configs
from qbara.train.config import RunConfig
from qbara.train.data import detect_format, read_records
from qbara.validate import safetensors_shapes

__all__ = ["data_stats", "plan_lines", "resolved_config"]


@dataclass
class _SplitStats:
    """One data split as the run sees it: records read, examples built (skipped = records that gave none),
    truncated to data.max_length, and token counts."""

    records: int
    examples: int
    skipped: int
    truncated: int
    tokens: int
    mean_length: float
    max_length: int


def _split_stats(examples, records: int, packed: bool) -> _SplitStats:
    """Statistics of `examples` built from `records` records. Packed text is cut into max_length pieces by
    design (none skipped or truncated)."""
    lengths = [len(e.input_ids) for e in examples]
    if packed:
        truncated, skipped = 0, 0
    else:
        truncated = sum(e.truncated for e in examples)
        skipped = records - len(examples)
    return _SplitStats(records, len(examples), skipped, truncated, sum(lengths),
                      sum(lengths) / len(lengths) if lengths else 0.0, max(lengths, default=0))


def data_stats(config: RunConfig, train_set, eval_set) -> dict[str, _SplitStats]:
    """Per split ('train', and 'eval' when there is one), the `split_stats` of the datasets `load_datasets` built
    for `config` (the records are counted as it reads and splits them)."""
    d = config.data
    records = read_records(d.train)
    if d.max_records:
        records = records[: d.max_records]
    eval_count = len(read_records(d.eval)) if d.eval else 0
    fmt = d.format if d.format != "auto" else detect_format(records)
    packed = fmt == "text"
    train_count = len(records)
    if not eval_count and d.held_out > 0 and not packed:
        eval_count = max(1, int(round(train_count * d.held_out)))
        train_count -= eval_count
    stats = {"train": _split_stats(train_set.examples, train_count, packed)}
    if eval_set is not None:
        stats["eval"] = _split_stats(eval_set.examples, eval_count, packed)
    return stats


def resolved_config(config: RunConfig) -> dict:
    """Every section of the run config with every key: the quant and adapter sections as their config
    classes complete them."""
    resolved = config.to_dict()
    resolved["quant"] = config.quant_config().to_dict()
    resolved["adapter"] = config.adapter_config().to_dict()
    return resolved


def base_quant(config: RunConfig, model) -> tuple[dict[str, QuantConfig], str]:
    """Layer name -> QuantConfig of the base the run trains on (`model` built from the config), and where it
    comes from: a quantized folder's manifest, the starting adapter's record, or the run's quant section."""
    name = config.model.name
    if is_quantized_folder(name):
        layers, _ = _read_manifest(Path(name).expanduser())
        return {n: QuantConfig.from_dict(q) for n, q in layers.items()}, "as saved in the quantized folder"
    if config.model.adapter:
        recorded = base_quant_for(name, config.model.adapter)
        if recorded is None:
            return {}, "none recorded by model.adapter (its base is loaded as it is)"
        return dict(recorded), f"as recorded by {config.model.adapter}"
    return layer_configs(model, config.quant_config(), ALL_LINEAR), "quant section"


def meta_model(config: RunConfig):
    """The model of config.model.name on the meta device (no weights), its embeddings tied as the config says
    (as a loaded model's are: counted once), and its config."""
    model_config = load_model_config(config.model.name)
    model = empty_model(model_config, torch.float32, source=config.model.name)
    model.tie_weights()
    return model, model_config


def trainable_parameters(config: RunConfig, model, quant: dict[str, QuantConfig]) -> int:
    """The trainable parameters of the run: a starting adapter's tensors (from its file header), else the
    adapters of the adapter section attached by qbara's builders to `model` (meta) whose linears carry the
    base's QuantConfig (what the methods' pooling and shapes depend on). LQ / LoftQ inits attach the same
    shapes as the default one."""
    if config.model.adapter:
        return sum(math.prod(shape) for shape in
                   safetensors_shapes(Path(config.model.adapter) / WEIGHTS_NAME).values())
    for name, qc in quant.items():
        model.get_submodule(name).quant_config = qc
    attach_adapters(model, dataclasses.replace(config.adapter_config(), init="default"))
    return trainable_parameter_count(model)


def _run_steps_for(examples: int, config: RunConfig, world: int = 1) -> int:
    """The optimizer steps of the run as HF's Trainer counts them: train.steps, or its epochs over `examples`
    (batches of batch_size per rank, grad_accum batches a step; at least one step an epoch)."""
    t = config.train
    if t.steps > 0:
        return t.steps
    return epoch_steps(math.ceil(examples / (t.batch_size * world)), t.grad_accum, t.epochs)


def epoch_steps(batches: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps of `epochs` passes over `batches` batches, `grad_accum` a step (HF Trainer's count)."""
    return math.ceil(epochs * max(math.ceil(batches / grad_accum), 1))


def _checkpoint_steps(steps: int, save_steps: int) -> list[int]:
    """The steps a checkpoint is saved at: every save_steps, and the last step (HF's Trainer saves there too)."""
    saved = list(range(save_steps, steps + 1, save_steps)) if save_steps > 0 else []
    return saved if saved and saved[-1] == steps else saved + [steps]


def _number(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def plan_lines(config: RunConfig, stats: dict[str, _SplitStats], resume_from: str | None) -> list[str]:
    """The plan of the run, one fact a line: model, quantization, adapter, steps, tokens, checkpoints, output."""
    model, model_config = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    quant, source = base_quant(config, model)
    sizes = {n: math.prod(model.get_submodule(n).weight.shape) for n in quant}  # before adapters wrap them
    trainable = trainable_parameters(config, model, quant)
    arch = (getattr(model_config, "architectures", None) or [type(model).__name__])[0]
    context = getattr(model_config, "max_position_embeddings", None)
    lines = [f"model: {config.model.name} ({arch}, {_number(total)} parameters, "
             f"{model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, context {context})"]
    if quant:
        quantized = sum(sizes.values())
        bits = sum(q.bits_per_param * sizes[n] for n, q in quant.items())
        labels = sorted({q.label for q in quant.values()})
        lines.append(f"quantization: {', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''} ({source}) on "
                     f"{len(quant)} linears ({_number(quantized)} weights), {bits / quantized:.3f} bits/param")
    else:
        lines.append(f"quantization: {source}")
    if config.model.adapter:
        lines.append(f"adapter: from {config.model.adapter} (the adapter section is not used), "
                     f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of the model)")
    else:
        a = config.adapter_config()
        targets = a.target_modules if isinstance(a.target_modules, str) else ",".join(a.target_modules)
        lines.append(f"adapter: {a.method}, rank {a.rank}, alpha {a.alpha:g}, targets {targets}, init {a.init}: "
                     f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of the model)")
    t = config.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = _run_steps_for(stats["train"].examples, config, world)
    per_step = t.batch_size * t.grad_accum * world
    how = f"train.steps={t.steps}" if t.steps > 0 else f"{t.epochs:g} epochs of {stats['train'].examples} examples"
    lines.append(f"steps: {steps} optimizer steps ({how}; {per_step} examples a step = batch {t.batch_size} x "
                 f"grad_accum {t.grad_accum} x {world} process(es))")
    lines.append(f"tokens a step: about {per_step * stats['train'].mean_length:,.0f} (at most "
                 f"{per_step * config.data.max_length:,} at data.max_length={config.data.max_length})")
    saved = _checkpoint_steps(steps, t.save_steps)
    shown = ", ".join(map(str, saved[:6])) + (f", ... {saved[-1]}" if len(saved) > 6 else "")
    evals = (f"; eval every {t.eval_steps} steps on {stats['eval'].examples} examples" if "eval" in stats
             and t.eval_steps else "")
    lines.append(f"checkpoints: at steps {shown} (the last {max(1, t.save_total_limit)} kept){evals}")
    output = Path(t.output_dir).expanduser().resolve()
    lines.append(f"output: {output} (adapter/, run_config.json, log_history.json, loss_curve.png)"
                 + (f"; resuming from {resume_from}" if resume_from else ""))
    return lines
