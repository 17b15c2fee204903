"""`qbara demo`: the main job on the embedded SmolLM2 — QA-HiRA on an INT4 (G=32) base fine-tuned on GSM8K
answers, evaluated before and after, folded into the 4-bit model, and evaluated again."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from qbara.adapters.merging import merge
from qbara.data import gsm8k_instructions, split_records
from qbara.eval.loss import masked_loss
from qbara.models.loader import load_model
from qbara.native import write_quantized
from qbara.outputs import output_folder
from qbara.pretrained import use_recorded_template
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.train.config import build_config
from qbara.train.data import build_examples, read_records
from qbara.train.trainer import prepare_for_training, train

__all__ = ["add_parser"]


def _gsm8k_instruction_files(out: Path, held_out: int, seed: int) -> tuple[Path, Path]:
    """Write GSM8K (bundled test split) as instruction records: train and held-out JSONL files."""
    records = gsm8k_instructions()
    train, held = split_records(records, held_out=held_out / len(records), seed=seed)
    paths = out / "gsm8k_train.jsonl", out / "gsm8k_heldout.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("\n".join(json.dumps(r) for r in part) + "\n")
    return paths


def _command(args) -> dict:
    out = Path(args.out)
    with output_folder(out, [args.model], overwrite=args.overwrite, command="demo") as folder:
        report, artifacts = _run(args, folder)
    print(f"{report['seconds']:.0f} s; artifacts in {out} (adapter: {out / artifacts['adapter']}, merged model: "
          f"{out / 'merged-int4'}, loss curve: {out / artifacts['loss_curve']})")
    return report


def _run(args, out: Path) -> tuple[dict, dict]:
    """The demo, writing into the new folder `out`."""
    start = time.perf_counter()
    train_file, held_file = _gsm8k_instruction_files(out, args.held_out, args.seed)
    config = build_config({
        "model": {"name": args.model},
        "quant": {"format": "int4", "block_size": 32},
        "adapter": {"method": "qahira", "rank": args.rank, "alpha": 2 * args.rank},
        "data": {"train": str(train_file), "max_length": args.max_length, "format": "instruction"},
        "train": {"output_dir": str(out / "train"), "steps": args.steps, "batch_size": args.batch_size,
                  "lr": args.lr, "save_steps": max(1, args.steps // 2), "logging_steps": max(1, args.steps // 20),
                  "seed": args.seed, "scheduler": "cosine", "warmup_steps": max(1, args.steps // 20)},
    })
    base, tokenizer = load_model(args.model, quant=QuantConfig("int4", 32))  # quantized as it is read
    held = build_examples(read_records(str(held_file)), tokenizer, "instruction", args.max_length, "fail",
                          source=str(held_file))
    # Before: the INT4 base with the (zero-initialised) QA-HiRA adapter, i.e. the quantized model itself.
    before_model = prepare_for_training(config, copy.deepcopy(base), tokenizer)
    before = masked_loss(before_model, held)["loss"]
    del before_model
    result = train(config, model=base, tokenizer=tokenizer)
    model = base
    model.eval()
    after = masked_loss(model, held)["loss"]
    merge(model, into="quantized")
    merged = masked_loss(model, held)["loss"]
    use_recorded_template(model, tokenizer)  # the merged folder prompts as the adapter was trained (data.template)
    write_quantized(model, tokenizer, out / "merged-int4")
    bits = QuantConfig("int4", 32).bits_per_param
    report = {
        "model": args.model, "base": "int4 g32 (GGUF Q4_1 grid)", "adapter": "qahira",
        "trainable_parameters": result.trainable_parameters, "steps": args.steps,
        "train_records": len(read_records(str(train_file))), "held_out_records": len(held),
        "held_out_loss_before": before, "held_out_loss_after": after, "held_out_loss_merged": merged,
        "merged_vs_adapter_rel_diff": abs(merged - after) / after, "bits_per_param_merged": bits,
        "fold_rounding": state_of(model).fold_rounding,
        "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nqbara demo: {args.model}, INT4 G32 base + QA-HiRA ({result.trainable_parameters:,} trainable), "
          f"{args.steps} steps on {report['train_records']} GSM8K records, held-out {len(held)} records")
    print(f"{'model':<40}{'held-out answer loss':>22}")
    print(f"{'INT4 base (before fine-tuning)':<40}{before:>22.4f}")
    print(f"{'INT4 base + QA-HiRA adapter':<40}{after:>22.4f}")
    print(f"{'merged into INT4 (same 5.0 bits/param)':<40}{merged:>22.4f}")
    print(f"merged vs adapter: {100 * report['merged_vs_adapter_rel_diff']:.4f}% difference (fp16 minima lost "
          f"{report['fold_rounding']:.1%} of the update)")
    artifacts = {"adapter": result.adapter_dir.relative_to(out),
                 "loss_curve": (result.output_dir / "loss_curve.png").relative_to(out)}
    return report, artifacts


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job: QA-HiRA fine-tune of SmolLM2 on GSM8K, folded into INT4")
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: an embedded name, a Hugging Face folder or a GGUF file (default %(default)s)")
    p.add_argument("--out", default="runs/demo", help="new folder for the run's artifacts (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step (default %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="QA-HiRA rank; alpha is 2 * rank (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine schedule (default %(default)s)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (default %(default)s)")
    p.add_argument("--held-out", type=int, default=32,
                   help="GSM8K records held out for the before/after loss (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the held-out split, the adapter init and the data order (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out folder qbara did not write (its files are kept)")
    p.set_defaults(func=_command)
