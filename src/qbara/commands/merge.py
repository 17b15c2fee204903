"""`qbara merge --model M --adapter DIR --out DIR [--into dense|quantized] [--overwrite]`."""
from __future__ import annotations

from pathlib import Path

from qbara.adapters.merging import merge
from qbara.commands.eval import add_quant_option, load_for_eval
from qbara.export import hf
from qbara.native import write_quantized
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.outputs import output_folder

__all__ = ["add_parser"]


def _command(args) -> Path:
    with output_folder(args.out, [args.model, args.adapter], overwrite=args.overwrite, command="merge") as tmp:
        model, tokenizer = load_for_eval(args.model, args.adapter, getattr(args, "quant", None))
        merge(model, into=args.into)
        if args.into == "quantized":
            write_quantized(model, tokenizer, tmp)
        else:
            hf.write_hf(model, tokenizer, tmp)
    quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    print(f"merged ({args.into}) model written to {args.out} ({quantized} quantized linear layers)")
    return Path(args.out)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base and save the model")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder")
    add_quant_option(p)
    p.add_argument("--out", required=True, help="output folder (a new one, or one qbara wrote before)")
    p.add_argument("--into", choices=("dense", "quantized"), default="dense",
                   help="dense: an HF folder; quantized: exact fold (qalora/qahira), native quantized folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder qbara did not write (its files are kept)")
    p.set_defaults(func=_command)
