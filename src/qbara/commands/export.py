"""`qbara export --model M [--adapter DIR [--quant FORMAT[:BLOCK]]] --format gguf|hf --out PATH`.

GGUF: adapters that fold into the quantized base are merged into the one file; plain LoRA adapters (which do
not) go out as a llama.cpp LoRA GGUF beside the base (`--adapter-out`, default OUT with .adapter.gguf), unless
--allow-requantize asks for one merged, re-quantized file.
"""
from __future__ import annotations

from pathlib import Path

from qbara.adapters.attach import adapter_layers
from qbara.commands.eval import add_quant_option, load_for_eval
from qbara.errors import QbaraError
from qbara.export import hf
from qbara.export.gguf import EMBEDDING_TYPES, is_plain_lora, write_gguf, write_gguf_lora
from qbara.outputs import output_file, output_folder

__all__ = ["add_parser"]


def _adapter_path(out) -> str:
    """Where the LoRA adapter GGUF goes beside the base `out`: m.gguf -> m.adapter.gguf."""
    out = str(out)
    return out[: -len(".gguf")] + ".adapter.gguf"


def _separate_lora(model, allow_requantize: bool) -> bool:
    """Write the adapters as their own LoRA GGUF: every adapter is plain LoRA (which never folds into the
    quantized base), and the user did not ask for a re-quantized merge (--allow-requantize)."""
    layers = adapter_layers(model).values()
    return not allow_requantize and bool(layers) and all(is_plain_lora(layer) for layer in layers)


def _run_gguf(args, inputs):
    if not str(args.out).endswith(".gguf"):
        raise QbaraError(f"--out {args.out!r}: a GGUF export is a file ending in .gguf")
    lora_out = args.adapter_out or _adapter_path(args.out)
    if not str(lora_out).endswith(".gguf") or Path(lora_out).resolve() == Path(args.out).resolve():
        raise QbaraError(f"--adapter-out {lora_out!r}: the LoRA adapter GGUF is a file ending in .gguf, other "
                         f"than --out")
    options = {"embedding_type": args.embedding_type, "output_type": args.output_type, "base_model": args.model,
               "dense_type": args.dense_type}
    with output_file(args.out, inputs, overwrite=args.overwrite):
        model, tokenizer = load_for_eval(args.model, args.adapter, getattr(args, "quant", None))
        if not _separate_lora(model, args.allow_requantize):
            report = write_gguf(model, tokenizer, args.out, lossy=args.allow_requantize, adapter=args.adapter,
                                **options)
            print(report.summary())
            return report
        with output_file(lora_out, inputs, overwrite=args.overwrite, option="--adapter-out"):
            report = write_gguf(model, tokenizer, args.out, separate_lora=True, **options)
            lora = write_gguf_lora(model, lora_out, base_model=args.model, adapter=args.adapter, dtype=args.lora_dtype)
    print(report.summary())
    print(lora.summary())
    print(f"the LoRA adapter does not merge into the quantized base without re-quantizing it, so it is its own "
          f"file: llama-cli -m {args.out} --lora {lora_out} (or --allow-requantize for one merged, lossy file)")
    return report


def _command(args):
    inputs = [args.model, args.adapter]
    if args.format == "gguf":
        return _run_gguf(args, inputs)
    with output_folder(args.out, inputs, overwrite=args.overwrite, command="export") as tmp:
        model, tokenizer = load_for_eval(args.model, args.adapter, getattr(args, "quant", None))
        hf.write_hf(model, tokenizer, tmp, dtype=args.dtype)
    print(f"dense HF model ({args.dtype}) written to {args.out}; adapters merged densely (exact in {args.dtype} "
          f"up to its rounding)")
    return args.out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a (fine-tuned) model as GGUF for llama.cpp (Q4_1 / Q5_1 / "
                                             "gguf:* blocks, plus a LoRA GGUF for plain LoRA adapters), or a "
                                             "dense HF folder")
    p.add_argument("--model", required=True, help="base model: name, HF folder, quantized folder")
    p.add_argument("--adapter", help="adapter folder (its recorded quantization is applied to the base)")
    add_quant_option(p)
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf",
                   help="gguf: one file for llama.cpp; hf: a dense Hugging Face folder (default %(default)s)")
    p.add_argument("--out", required=True, help="output .gguf file or HF folder")
    p.add_argument("--allow-requantize", action="store_true",
                   help="gguf: re-quantize layers that are neither INT4 / INT5 G32 nor gguf:* (lossy; the error is "
                        "reported); plain LoRA adapters are then merged into one file instead of written beside it")
    p.add_argument("--adapter-out", help="gguf: the LoRA adapter GGUF written for plain LoRA adapters "
                                         "(default: OUT with .adapter.gguf)")
    p.add_argument("--lora-dtype", choices=("f32", "f16"), default="f32",
                   help="gguf: the LoRA adapter GGUF's tensor type (f16: half the bytes, values rounded to fp16)")
    p.add_argument("--embedding-type", choices=EMBEDDING_TYPES, default="q8_0", metavar="TYPE",
                   help="gguf: token embedding type: q8_0, f16, f32 or another GGML block type (e.g. q6_k, as "
                        "llama.cpp's presets use; its block must divide the hidden size)")
    p.add_argument("--output-type", choices=EMBEDDING_TYPES, metavar="TYPE",
                   help="gguf: an untied lm_head's type (default: the embedding's)")
    p.add_argument("--dense-type", choices=("f32", "f16"),
                   help="gguf: write layers that are neither INT4 / INT5 G32 nor gguf:* (a dense model, adapters that "
                        "do not fold) as this float type (f32 exact, f16 rounded and reported) instead of refusing "
                        "them")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="hf: weight dtype")
    p.add_argument("--overwrite", action="store_true",
                   help="write over an output qbara did not write (a folder's other files are kept)")
    p.set_defaults(func=_command)
