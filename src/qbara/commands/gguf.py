"""`qbara gguf --model M (--budget BITS [--file-budget] | --size 88MB | --match Q4_K_M) [--calibration SRC ...]
[--costs fisher|imatrix|plain] [--rounding fisher|imatrix | --no-weighted-rounding] [--formats F,F,...]
--out model.gguf`: a mixed GGUF straight from a checkpoint, each linear in the llama.cpp block format the ILP
allocates under the budget (`qbara.export.gguf.mix`). Beside the file: OUT.mix.json (per-layer formats,
bits/param, estimated error) and OUT.mix.png."""
from __future__ import annotations

import json

from qbara.commands.eval import read_text
from qbara.errors import QbaraError
from qbara.eval.harness import count_type
from qbara.export.gguf.checks import check_path
from qbara.export.gguf.mix import COSTS, ROUNDINGS, parse_size, write_mixed_gguf
from qbara.export.gguf.presets import PRESETS
from qbara.outputs import check_output
from qbara.quant.ggml import GGML_FORMATS
from qbara.train.data import read_records

__all__ = ["add_parser"]


def calibration_text(spec: str) -> str:
    """The text of one --calibration source: a text / JSONL / CSV file, shakespeare:PLAY, or dataset:PATH (the
    records' "text" fields)."""
    if spec.startswith("dataset:"):
        texts = [r["text"] for r in read_records(spec) if isinstance(r, dict) and isinstance(r.get("text"), str)]
        if not texts:
            raise QbaraError(f"--calibration {spec}: no record has a \"text\" field; give a dataset of texts")
        return "\n\n".join(texts)
    return read_text(spec)


def _match(spec: str | None) -> tuple[str | None, bool]:
    """--match PRESET[+imatrix] -> (preset, with an importance matrix)."""
    if spec is None:
        return None, False
    name, plus, extra = spec.partition("+")
    if plus and extra.lower() != "imatrix":
        raise QbaraError(f"--match {spec!r}: write a llama.cpp preset ({', '.join(PRESETS)}), optionally with "
                         f"+imatrix (the file llama-quantize writes with an importance matrix)")
    return name, bool(plus)


def _formats(spec: str | None) -> list[str] | None:
    """--formats q4_k,iq4_nl,... -> the names (None: every GGML format)."""
    if spec is None:
        return None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise QbaraError(f"--formats {spec!r} names no format: give a comma-separated list ({', '.join(GGML_FORMATS)})")
    return names


def _command(args):
    check_path(args.out)
    match, match_imatrix = _match(args.match)
    size = parse_size(args.size) if args.size is not None else None
    texts = [calibration_text(spec) for spec in args.calibration or []]  # read before the model loads
    check_output(args.out, [args.model, *(args.calibration or [])], overwrite=args.overwrite, kind="file")
    report = write_mixed_gguf(args.model, args.out, bits=args.budget, file_budget=args.file_budget, size=size,
                              match=match, match_imatrix=match_imatrix, calibration=texts, costs=args.costs,
                              weighted_rounding=False if args.no_weighted_rounding else None,
                              rounding=args.rounding,
                              samples=args.calibration_samples, length=args.calibration_length, seed=args.seed,
                              overwrite=args.overwrite, progress=not args.json,
                              formats=_formats(args.formats))
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"}, indent=1))
    else:
        print(report.summary())
        print(f"report: {report.path.with_suffix('.mix.json')}, plot: {report.path.with_suffix('.mix.png')}")
    return report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gguf", help="a mixed GGUF from a checkpoint under a size budget: every linear in the "
                                           "llama.cpp block format an ILP allocates")
    p.add_argument("--model", default="smollm2-135m",
                   help="dense checkpoint: smollm2-135m, gemma3-270m, tiny-llama, or a local HF folder")
    p.add_argument("--out", required=True, help="the .gguf file to write (OUT.mix.json / .mix.png beside it)")
    budget = p.add_argument_group("budget (exactly one)")
    budget.add_argument("--budget", type=float, help="bits per parameter of the linear layers (with --file-budget: "
                                                     "of the whole file, embedding and norms included)")
    budget.add_argument("--file-budget", action="store_true", help="--budget counts the whole file")
    budget.add_argument("--size", help="the whole file at most this size: 88MB, 90MiB or bytes")
    budget.add_argument("--match", metavar="PRESET[+imatrix]",
                        help=f"the tensor data of llama.cpp's preset file for this model ({', '.join(PRESETS)}); "
                             f"+imatrix: as llama-quantize makes it with an importance matrix")
    p.add_argument("--calibration", action="append", metavar="SRC",
                   help="calibration text (repeatable, one domain each, sequences shared evenly): a file, "
                        "shakespeare:PLAY or dataset:PATH")
    p.add_argument("--costs", choices=COSTS, default="fisher",
                   help="the ILP's error measure: fisher (Fisher-weighted, default), imatrix (weighted by input "
                        "activations, llama.cpp's statistic) or plain (unweighted, no calibration)")
    p.add_argument("--no-weighted-rounding", action="store_true",
                   help="round every block unweighted (default: weighted by the costs' statistic, as "
                        "llama-quantize rounds under an importance matrix)")
    p.add_argument("--formats", metavar="F,F,...",
                   help="the candidate GGML formats, comma-separated (default all: " + ", ".join(GGML_FORMATS)
                        + "); e.g. leave out iq3_s,iq3_xxs on large models: their search takes ~7-10x iq4_xs's time")
    p.add_argument("--rounding", choices=ROUNDINGS, default=None,
                   help="the statistic weighting the rounding when it differs from the costs': fisher (per weight) "
                        "or imatrix (per input column, llama.cpp's)")
    p.add_argument("--calibration-samples", type=count_type(1), default=64, help="calibration sequences in all")
    p.add_argument("--calibration-length", type=count_type(2), default=256, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--overwrite", action="store_true", help="write over a file qbara did not write")
    p.set_defaults(func=_command)
