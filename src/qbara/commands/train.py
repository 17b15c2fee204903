"""`qbara train --config run.yaml [--resume] [--section.key value ...]`."""
from __future__ import annotations

from qbara.distributed import end_process_group
from qbara.errors import QbaraError
from qbara.train.config import load_run_config, parse_value
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
    result = train(config, resume=args.resume)
    end_process_group()
    print(f"adapter saved to {result.adapter_dir} ({result.trainable_parameters:,} trainable parameters); "
          f"final train loss {result.final_loss}; loss curve {result.output_dir / 'loss_curve.png'}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune adapters on a quantized model from a YAML run config",
                              description="Extra --section.key value pairs override the config file "
                                          "(e.g. --train.lr 1e-4 --adapter.method qbara).")
    p.add_argument("--config", help="YAML run config (sections model, quant, adapter, data, train)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.set_defaults(func=run, accepts_extra=True)
