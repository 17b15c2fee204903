"""`qbara train --config run.yaml [--resume] [--print-config] [--section.key value ...]`."""
from __future__ import annotations

import dataclasses

from qbara.distributed import end_process_group
from qbara.errors import QbaraError
from qbara.train.config import RunConfig, load_run_config, parse_value, valid_keys
from qbara.train.config_reference import format_config
from qbara.train.trainer import train


def parse_overrides(tokens: list[str]) -> dict:
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


def run(args, extra: list[str]) -> None:
    config = load_run_config(args.config, parse_overrides(extra))
    if args.print_config:
        print(format_config(config), end="")
        return
    result = train(config, resume=args.resume)
    end_process_group()
    print(f"adapter saved to {result.adapter_dir} ({result.trainable_parameters:,} trainable parameters); "
          f"final train loss {result.final_loss}; loss curve {result.output_dir / 'loss_curve.png'}")


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
    p.set_defaults(func=run, accepts_extra=True)
