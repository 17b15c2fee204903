"""`qbara export --model M [--adapter DIR] --format gguf|hf --out PATH`."""
from __future__ import annotations


def run(args):
    from qbara.commands.eval import load_for_eval
    from qbara.errors import QbaraError
    from qbara.outputs import output_file, output_folder

    inputs = [args.model, args.adapter]
    if args.format == "gguf":
        from qbara.export.gguf import write_gguf

        if not str(args.out).endswith(".gguf"):
            raise QbaraError(f"--out {args.out!r}: a GGUF export is a file ending in .gguf")
        with output_file(args.out, inputs, overwrite=args.overwrite):
            model, tokenizer = load_for_eval(args.model, args.adapter)
            report = write_gguf(model, tokenizer, args.out, lossy=args.allow_requantize,
                                embedding_type=args.embedding_type, base_model=args.model, adapter=args.adapter)
        print(report.summary())
        return report
    from qbara.export.hf import write_hf

    with output_folder(args.out, inputs, overwrite=args.overwrite, command="export") as tmp:
        model, tokenizer = load_for_eval(args.model, args.adapter)
        write_hf(model, tokenizer, tmp, dtype=args.dtype)
    print(f"dense HF model ({args.dtype}) written to {args.out}; adapters merged densely (exact in {args.dtype} "
          f"up to its rounding)")
    return args.out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a (fine-tuned) model as GGUF Q4_1 for llama.cpp, or a dense HF folder")
    p.add_argument("--model", required=True, help="base model: name, HF folder, quantized folder")
    p.add_argument("--adapter", help="adapter folder (its recorded quantization is applied to the base)")
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf")
    p.add_argument("--out", required=True, help="output .gguf file or HF folder")
    p.add_argument("--allow-requantize", action="store_true",
                   help="gguf: re-quantize layers that are not INT4 G32 (lossy; the error is reported)")
    p.add_argument("--embedding-type", choices=("q8_0", "f16", "f32"), default="q8_0", help="gguf: token embedding type")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="hf: weight dtype")
    p.add_argument("--overwrite", action="store_true",
                   help="write over an output qbara did not write (a folder's other files are kept)")
    p.set_defaults(func=run)
