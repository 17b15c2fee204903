"""`qbara merge --model M --adapter DIR --out DIR [--into dense|quantized]`."""
from __future__ import annotations

from pathlib import Path


def run(args) -> Path:
    from qbara.adapters.merge import merge
    from qbara.commands.eval import load_for_eval
    from qbara.models.quantized_io import save_quantized
    from qbara.nn.quantized_linear import QuantizedLinear

    model, tokenizer = load_for_eval(args.model, args.adapter)
    merge(model, into=args.into)
    if args.into == "quantized":
        out = save_quantized(model, tokenizer, args.out)
    else:
        from qbara.export.hf import export_hf

        out = export_hf(model, tokenizer, args.out, overwrite=True)
    quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    print(f"merged ({args.into}) model written to {out} ({quantized} quantized linear layers)")
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base and save the model")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--into", choices=("dense", "quantized"), default="dense",
                   help="dense: an HF folder; quantized: exact fold (qalora/qahira), native quantized folder")
    p.set_defaults(func=run)
