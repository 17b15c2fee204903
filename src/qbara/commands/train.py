"""`qbara train --config run.yaml [--resume] [--dry-run] [--print-config] [--section.key value ...]`."""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import yaml

from qbara.adapters.io import read_adapter_config
from qbara.distributed import end_process_group
from qbara.errors import QbaraError
from qbara.models.loader import base_model_path
from qbara.prompt_formats import NAMED
from qbara.train.config import RunConfig, load_run_config, parse_value, valid_keys
from qbara.train.config_reference import format_config
from qbara.train.data import IGNORE_INDEX
from qbara.train.plan import data_stats, plan_lines, resolved_config
from qbara.train.trainer import (
    TrainInterrupted,
    TrainResult,
    check_before_load,
    check_train_output,
    latest_complete_checkpoint,
    load_datasets,
    refuse_checkpoints,
    train,
    training_arguments,
)

__all__ = ["add_parser"]


def _parse_overrides(tokens: list[str]) -> dict:
    """['--train.lr', '1e-4', '--adapter.method', 'qbara'] -> {'train.lr': 0.0001, 'adapter.method': 'qbara'}."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise QbaraError(f"unexpected argument {token!r}: overrides are written --section.key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise QbaraError(f"override {token} has no value: write {token} VALUE")
            value, i = tokens[i + 1], i + 1
        overrides[key] = parse_value(value)
        i += 1
    return overrides


def _command(args, extra: list[str]) -> None:
    config = load_run_config(args.config, _parse_overrides(extra))
    if args.print_config:
        print(format_config(config), end="")
        return
    if args.dry_run:
        _dry_run(config, args.resume)
        return
    try:
        result = train(config, resume=args.resume)
    except TrainInterrupted as stop:  # the CLI prints this one line (exit 130)
        raise KeyboardInterrupt(_interrupted_line(stop, args, extra)) from None
    end_process_group()
    loss = (f"final train loss {result.final_loss:.4g}" if result.final_loss is not None else
            f"no train loss logged (train.logging_steps={config.train.logging_steps} is past the run's last step)")
    print(f"adapter saved to {result.adapter_dir} ({result.trainable_parameters:,} trainable parameters); {loss}; "
          f"loss curve {result.output_dir / 'loss_curve.png'}")
    print("\n".join(_next_commands(config, result)))


def _interrupted_line(stop: TrainInterrupted, args, extra: list[str]) -> str:
    """`interrupted at step N (last checkpoint: step M); resume with: qbara train --config ... --resume`, the
    command line given (config path and overrides) with --resume."""
    command = ["qbara", "train", *(["--config", args.config] if args.config else []), *extra, "--resume"]
    at = "before the first step" if stop.step is None else f"at step {stop.step}"
    last = "no checkpoint yet" if stop.checkpoint is None else f"last checkpoint: step {stop.checkpoint}"
    return f"interrupted {at} ({last}); resume with: {shlex.join(command)}"


def _next_commands(config: RunConfig, result: TrainResult) -> list[str]:
    """What to run on the trained adapter, with this run's paths: eval, merge, export, generate."""
    adapter = result.adapter_dir
    recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    # the model the adapter was trained on: the run's model (as it was named), or the LQ / LoftQ base it saved
    model = config.model.name if recorded in (None, base_model_path(config.model.name)) else recorded
    out = result.output_dir
    data = config.data.eval or config.data.train
    seen = "" if config.data.eval else "  # the training records: set data.eval for held-out ones in a file"
    q = shlex.quote
    m, a = q(str(model)), q(str(adapter))
    merge = (f"--into quantized --out {q(str(out / 'merged-quantized'))}  # folds exactly into the quantized base"
             if result.folds else f"--out {q(str(out / 'merged'))}  # dense")
    return ["next:",
            f"  qbara eval --model {m} --adapter {a} --task loss --data {q(data)} --window {config.data.max_length}"
            f"{seen}",
            f"  qbara merge --model {m} --adapter {a} {merge}",
            f"  qbara export --model {m} --adapter {a} --format gguf --out {q(str(out / 'model.gguf'))}",
            f"  qbara generate --model {m} --adapter {a} --prompt \"...\""]


def _dry_run(config: RunConfig, resume: bool) -> None:
    """Every check of the run, then the resolved config, the data statistics and the plan; no weights are
    loaded and nothing is written (`qbara.train.plan`)."""
    out = check_train_output(config)
    if not resume:
        refuse_checkpoints(out)
    resume_from = latest_complete_checkpoint(out) if resume else None
    tokenizer = check_before_load(config)
    train_set, eval_set = load_datasets(config, tokenizer)
    training_arguments(config, eval_set is not None)  # the trainer's own checks of its settings
    stats = data_stats(config, train_set, eval_set)
    print("# resolved run config")
    print(yaml.safe_dump(resolved_config(config), sort_keys=False).rstrip())
    print("# data")
    for split, s in stats.items():
        source = config.data.eval if split == "eval" and config.data.eval else config.data.train
        source += f" (held out: data.held_out={config.data.held_out:g})" if split == "eval" and not config.data.eval \
            else ""
        print(f"{split}: {s.records} records -> {s.examples} examples ({s.skipped} skipped, {s.truncated} truncated "
              f"at data.max_length={config.data.max_length}) from {source}; {s.tokens:,} tokens, mean length "
              f"{s.mean_length:.1f}, max {s.max_length}")
    print(_prompt_line(config, train_set, tokenizer))
    print("# plan")
    for line in plan_lines(config, stats, str(resume_from) if resume_from else None):
        print(line)
    print(f"dry run: no weights loaded, no run output written; run it with the same command without --dry-run "
          f"(output {Path(config.train.output_dir)})")


def _prompt_line(config: RunConfig, train_set, tokenizer) -> str:
    """Which template renders the records (what data.template resolved to) and the first training prompt as the
    model sees it (up to its first answer token)."""
    text = train_set.chat_template
    if text is None:
        return "prompts: none (text data is packed as it is)"
    choice = config.data.template
    if choice == "auto":
        named = next((name for name, jinja in NAMED.items() if jinja == text), None)
        choice = f"auto -> {named} (the tokenizer has no chat template)" if named else \
            "auto -> the tokenizer's own chat template"
    first = train_set.examples[0]
    answer = next((i for i, label in enumerate(first.labels) if label != IGNORE_INDEX), len(first.labels))
    prompt = tokenizer.decode(first.input_ids[:answer])
    shown = prompt if len(prompt) <= 400 else prompt[:200] + " ... " + prompt[-190:]
    return f"prompts: data.template {choice}; the first record's prompt: {shown!r}"


def _key_list() -> str:
    """'model: name, dtype, ...; quant: ...' for the help text."""
    sections: dict[str, list[str]] = {f.name: [] for f in dataclasses.fields(RunConfig)}
    for key in valid_keys():
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(name)
    return "; ".join(f"{section}: {', '.join(names)}" for section, names in sections.items())


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune adapters on a quantized model from a YAML run config",
                              description="Extra --section.key value pairs override the config file "
                                          "(e.g. --train.lr 1e-4 --adapter.method qbara).",
                              epilog=f"config keys: {_key_list()}. --print-config shows each with its default and "
                                     f"what it does; docs/config.md is the reference.")
    p.add_argument("--config", help="YAML run config (sections model, quant, adapter, data, train)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--print-config", action="store_true",
                   help="print every config key with its value (the defaults, or as --config and the overrides "
                        "resolve it) and a one-line doc, as a YAML run config; then exit without training")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the data, print the resolved config, the data statistics and the "
                        "plan (steps, trainable parameters, checkpoints) without loading weights; writes nothing")
    p.set_defaults(func=_command, accepts_extra=True)
