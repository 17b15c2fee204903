"""The benchmark suite in one command: quantization quality (QLoRA, LoftQ, LQ-LoRA ± Fisher), fine-tuning
quality of every method at equal parameters and steps (adapter and merged low-bit models), and speed/memory
against PEFT + bitsandbytes and dense LoRA, on the embedded SmolLM2-135M. Writes report.md, results.json and
the PNG plots into one folder.

    python bench/run_all.py --quick                  # reduced setting: under 30 min on a 2-core CPU
    python bench/run_all.py                          # full setting (see README for its time)
    python bench/run_all.py --device cuda --out bench-results-gpu
    python bench/run_all.py --quick --readme         # also refresh the README's results section

Parts can be skipped (--skip quality finetune speed). On CUDA the speed part runs in bf16.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune_quality  # noqa: E402
import lq_smollm2  # noqa: E402
import speed_memory  # noqa: E402

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
PARTS = ("quality", "finetune", "speed")


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results", help="output folder (report.md, results.json, PNGs)")
    ap.add_argument("--quick", action="store_true", help="reduced setting (fewer steps, seeds, budgets)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default 40; quick 10)")
    ap.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default 0 1 2; quick 0)")
    ap.add_argument("--readme", action="store_true", help="write the results section of README.md from this run")
    return ap.parse_args(argv)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text + f", {torch.get_num_threads()} torch threads"


def part_arguments(args) -> dict[str, list[str]]:
    """Each part's own command-line arguments for the chosen setting."""
    out = ["--out", args.out]
    quality = ["--ppl", "--out", args.out]
    finetune = ["--device", args.device, *out]
    speed = ["--device", args.device, *out]
    if args.quick:
        quality += ["--budgets", "2.75", "3.25", "--ppl-tokens", "4096"]
        finetune += ["--steps", str(args.steps or 10), "--batch", "2", "--held-out", "16", "--gsm-length", "160",
                     "--lq-configs", "qlora", "--lq-iters", "20",
                     "--methods", "qlora", "qalora", "qbara", "qahira", "qahira-tile", "loftq", "lq-3.25", "lq-2.75",
                     "lq-fisher-2.75", "--fisher-samples", "8"]
        speed += ["--quick"]
    else:
        quality += ["--fisher"]
        finetune += ["--steps", str(args.steps or 40)]
    if args.seeds:
        finetune += ["--seeds", *map(str, args.seeds)]
    elif args.quick:
        finetune += ["--seeds", "0"]
    return {"quality": quality, "finetune": finetune, "speed": speed}


def report(results: dict, args, command: str, seconds: dict) -> str:
    date = datetime.date.today().isoformat()
    lines = [f"# qbara benchmarks on SmolLM2-135M ({'reduced' if args.quick else 'full'} setting)", "",
             f"- date: {date}", f"- machine: {machine()}", f"- command: `{command}`",
             "- wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()), ""]
    if "quality" in results:
        q = results["quality"]
        t = q["timing"]
        lines += ["## Quantization quality without training", "",
                  f"Rank-{q['rank']} LQ-LoRA decompositions, Hamlet perplexity ({q.get('ppl_tokens')} tokens, window "
                  f"{q.get('window')}). Error table 210 × 432: {t['table_s']:.0f} s wall ({t['table_source']}; "
                  f"{t['table_compute_s']:.0f} s when it was built), {t['budgets']} ILP allocations "
                  f"{t['allocations_s']:.1f} s.", "", lq_smollm2.markdown(q), "", "![](lq_quality.png)", ""]
    if "finetune" in results:
        lines += ["## Fine-tuning quality at equal parameters and steps", "",
                  finetune_quality.markdown(results["finetune"]), "", "![](finetune_quality.png)", ""]
    if "speed" in results:
        lines += ["## Speed and memory", "", speed_memory.markdown(results["speed"]), "", "![](speed_memory.png)", ""]
    return "\n".join(lines)


def update_readme(report_text: str, readme: Path, out: Path) -> None:
    """Replace the README's generated results section (between the bench markers) with this report."""
    from qbara.atomic import write_file_atomic

    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section to fill")
    body = report_text.split("\n", 1)[1]  # drop the report's title
    rel = os.path.relpath(out, readme.parent)
    body = body.replace("![](", f"![]({rel}/")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    new = f"{head}{README_START}\n{body.strip()}\n{README_END}{tail}"
    write_file_atomic(readme, lambda tmp: Path(tmp).write_text(new))


def main(argv=None) -> None:
    from qbara.atomic import write_file_atomic, write_json_atomic
    from qbara.models import load_model

    args = options(argv)
    command = "python bench/run_all.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = part_arguments(args)
    model, tokenizer = load_model("smollm2-135m")
    results, seconds = {}, {}
    for part in PARTS:
        if part in args.skip:
            continue
        start = time.perf_counter()
        print(f"\n=== {part} ===", flush=True)
        if part == "quality":
            results[part] = lq_smollm2.run(lq_smollm2.options(parts[part]), model, tokenizer)
        elif part == "finetune":
            results[part] = finetune_quality.run(finetune_quality.options(parts[part]), model, tokenizer)
        else:
            results[part] = speed_memory.run(parts[part])
        seconds[part] = time.perf_counter() - start
        write_json_atomic(out / "results.json", {"command": command, "seconds": seconds, **results})
    text = report(results, args, command, seconds)
    write_file_atomic(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    print("\n" + text)
    if args.readme:
        update_readme(text, Path(__file__).resolve().parent.parent / "README.md", out)
        print(f"README results section updated from {out / 'report.md'}")


if __name__ == "__main__":
    main()
