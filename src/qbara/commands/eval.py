"""`qbara eval --model M [--adapter DIR [--quant FORMAT[:BLOCK]]] --task ppl|loss|lm-eval --data FILE|TASKS
[--window N] [--json]`.

`--task loss` renders instruction and chat records with the chat template the adapter records (its
chat_template.jinja: the one it was trained with), else the model's own, else Alpaca (`qbara.prompt_formats`).

--quant gives the quantization of a PEFT adapter folder's base (PEFT records none), e.g. `--quant int4:32` for
a LoRA trained with PEFT on a qbara INT4 G32 base; a qbara adapter records its own.

`--task lm-eval` runs lm-evaluation-harness tasks (`--data` names them, comma-separated) on the in-memory
model: `--limit`, `--num-fewshot`, `--batch-size`, `--include-path` (a folder of local task YAMLs) and
`--output-path` (the results as JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

from qbara.adapters.io import read_chat_template
from qbara.commands.quantize import parse_format
from qbara.data import shakespeare_text
from qbara.errors import QbaraError
from qbara.eval.harness import (
    LM_EVAL_OPTIONS,
    TASKS_HINT,
    check_output_path,
    count_type,
    lm_eval_bridge,
    load_lm_eval_tasks,
    parse_batch_size,
    parse_limit,
)
from qbara.eval.loss import masked_loss
from qbara.eval.perplexity import text_perplexity
from qbara.models.loader import load_model_tokenizer
from qbara.pretrained import from_pretrained
from qbara.train.data import build_examples, read_records
from qbara.validate import read_text_file

__all__ = ["add_parser"]


def load_for_eval(model_name: str, adapter: str | None, quant: str | None = None):
    """The base model with `adapter` attached; a dense base is quantized on load as the adapter records, or as
    `quant` (FORMAT[:BLOCK], `--quant`) says for a PEFT adapter folder."""
    if quant is not None and not adapter:
        raise QbaraError(f"--quant {quant} is the quantization of a PEFT adapter's base; it needs --adapter")
    config = parse_format(quant) if quant is not None else None
    model, tokenizer = from_pretrained(model_name, quant=config, adapter=adapter or None)
    model.eval()
    return model, tokenizer


def _eval_tokenizer(model_name: str, adapter: str | None):
    """The tokenizer `load_for_eval` will return, read without the model: the model's, with the chat template the
    adapter records (if it records one)."""
    tokenizer = load_model_tokenizer(model_name)
    recorded = read_chat_template(adapter) if adapter else None
    if recorded is not None:
        tokenizer.chat_template = recorded
    return tokenizer


def add_quant_option(parser) -> None:
    """--quant: the base's quantization for a PEFT adapter folder (eval, merge, export)."""
    parser.add_argument("--quant", metavar="FORMAT[:BLOCK]",
                        help="how the base of a PEFT --adapter folder was quantized (PEFT records none), as in "
                             "qbara quantize --formats: e.g. int4:32, nf4:64; a qbara adapter records its own")


def read_text(data: str) -> str:
    """A text file, or `shakespeare:PLAY` for a bundled play."""
    if data.startswith("shakespeare:"):
        return shakespeare_text(data.split(":", 1)[1] or "hamlet")
    path = Path(data)
    if not path.exists():
        raise QbaraError(f"data file {data!r} not found; pass a text file or shakespeare:PLAY")
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        return "\n\n".join(r["text"] for r in read_records(data) if isinstance(r, dict) and "text" in r)

    return read_text_file(path, "data file", max_bytes=None)


def _command(args) -> dict:
    lm_eval_given = [f"--{name.replace('_', '-')}" for name in LM_EVAL_OPTIONS
                     if getattr(args, name, None) is not None]
    if args.task != "lm-eval" and lm_eval_given:
        verb = "applies" if len(lm_eval_given) == 1 else "apply"
        raise QbaraError(f"{', '.join(lm_eval_given)} only {verb} to --task lm-eval (this is --task {args.task})")
    if args.data is None:
        if args.task != "ppl":
            what = "instruction or chat records (a .jsonl file)" if args.task == "loss" else \
                f"lm-eval task names (comma-separated); {TASKS_HINT}"
            raise QbaraError(f"--task {args.task} needs --data: {what}")
        args.data = "shakespeare:hamlet"
    tasks = output_path = None
    if args.task == "lm-eval":
        # Check the output path and load the tasks (their datasets) before the model: fail fast.
        output_path = check_output_path(args.output_path)
        tasks = load_lm_eval_tasks(args.data, args.include_path)
    # The data is read and checked (records tokenized with the model's tokenizer files) before the model loads.
    text = read_text(args.data) if args.task == "ppl" else None
    if args.task == "loss":
        records = read_records(args.data)[: args.max_records or None]
        examples = build_examples(records, _eval_tokenizer(args.model, args.adapter), "auto", args.window, "fail",
                                  source=args.data)
    model, tokenizer = load_for_eval(args.model, args.adapter, getattr(args, "quant", None))
    if args.task == "ppl":
        r = text_perplexity(model, tokenizer, text, window=args.window, max_tokens=args.max_tokens or None,
                            progress=not args.json)
        result = {"task": "ppl", "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "window": r.window}
    elif args.task == "loss":
        result = {"task": "loss", **masked_loss(model, examples, progress=not args.json)}
    else:
        result = {"task": "lm-eval", **lm_eval_bridge(
            model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
            batch_size=args.batch_size if args.batch_size is not None else 1, output_path=output_path,
            provenance={"model": args.model, "adapter": args.adapter})}
    result.update(model=args.model, adapter=args.adapter)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.task == "lm-eval":
        for name, metrics in result["results"].items():
            shown = {k: v for k, v in metrics.items()
                     if k not in ("alias", "name", "sample_len") and isinstance(v, (int, float, str))}
            print(f"{name}: " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in shown.items()))
        if result.get("output_path"):
            print(f"results written to {result['output_path']}")
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity, masked answer loss, or lm-eval tasks")
    p.add_argument("--model", default="smollm2-135m", help="model name, HF folder, quantized folder or .gguf")
    p.add_argument("--adapter", help="adapter folder written by qbara train / save_adapter, or a PEFT LoRA folder")
    add_quant_option(p)
    p.add_argument("--task", choices=("ppl", "loss", "lm-eval"), default="ppl",
                   help="ppl: perplexity of a text; loss: masked answer loss on instruction/chat records; lm-eval: "
                        "lm-evaluation-harness tasks (default %(default)s)")
    p.add_argument("--data", "--tasks", dest="data",
                   help="ppl: text file or shakespeare:PLAY (default shakespeare:hamlet); loss: instruction/chat "
                        "records; lm-eval: task names (comma-separated; glob patterns allowed; --tasks as in "
                        "lm-eval; qbara_shakespeare_next_line is bundled and offline)")
    p.add_argument("--window", type=int, default=512, help="ppl window / max record length in tokens")
    p.add_argument("--max-tokens", type=int, default=0, help="ppl: tokens evaluated (0 = all)")
    p.add_argument("--max-records", type=int, default=0, help="loss: records evaluated (0 = all)")
    g = p.add_argument_group("lm-eval (--task lm-eval; --data names the tasks, comma-separated)")
    g.add_argument("--limit", type=parse_limit, help="examples per task (e.g. 100) or a fraction of each (e.g. 0.1)")
    g.add_argument("--num-fewshot", type=count_type(0), help="few-shot examples (default: each task's own)")
    g.add_argument("--batch-size", type=parse_batch_size, help="batch size (default 1; 'auto' to search)")
    g.add_argument("--include-path", action="append", metavar="FOLDER",
                   help="folder of local task YAMLs (repeatable); needed offline, where Hub datasets cannot load")
    g.add_argument("--output-path", metavar="FILE", help="write the full results as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print the result as JSON (and no progress bar)")
    p.set_defaults(func=_command)
