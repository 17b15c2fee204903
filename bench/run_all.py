"""The benchmark suite in one command: quantization quality (QLoRA, LoftQ, LQ-LoRA ± Fisher), fine-tuning
quality of every method at equal parameters and steps (adapter and merged low-bit models), and speed/memory
against PEFT + bitsandbytes and dense LoRA, on the embedded SmolLM2-135M. Writes report.md, results.json and
the PNG plots into one folder.

    python bench/run_all.py --quick                  # reduced setting: under 30 min on a 2-core CPU
    python bench/run_all.py                          # full setting (see docs/benchmarks.md for its time)
    python bench/run_all.py --device cuda --out bench-results-gpu
    python bench/run_all.py --quick --readme         # also refresh the results section of docs/benchmarks.md

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
# The file whose generated results section (between the markers) --readme rewrites; the README links to it.
SUMMARY_FILE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
PARTS = ("quality", "finetune", "speed")


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results", help="output folder (report.md, results.json, PNGs)")
    ap.add_argument("--quick", action="store_true", help="reduced setting (fewer steps, seeds, budgets)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default 40; quick 10)")
    ap.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default 0 1 2; quick 0)")
    ap.add_argument("--readme", action="store_true",
                    help="write the results section of docs/benchmarks.md (the README's benchmark page) from this run")
    ap.add_argument("--from-json", metavar="RESULTS", help="run nothing: rewrite report.md (and with --readme the "
                                                          "docs/benchmarks.md section) from a results.json written "
                                                          "earlier")
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


def report(results: dict, args, command: str, seconds: dict, meta: dict) -> str:
    lines = [f"# qbara benchmarks on SmolLM2-135M ({'reduced' if args.quick else 'full'} setting)", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- command: `{command}`",
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


def readme_summary(results: dict, command: str, seconds: dict, meta: dict, out: str) -> str:
    """The short results section of docs/benchmarks.md: one table, the merge findings, the speed ratios, one plot.

    The smoke-test claim lines stay in report.md only: 10 steps at one lr decide no paper claim, and the paper
    setting's verdicts (bench/finetune_quality.py --paper) supersede them."""
    lines = [f"From `{command}` on {meta['date']} ({meta['machine']}); wall time "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
             + f". Full report with every table and plot: [{out}/report.md]({out}/report.md)."]
    ft = results.get("finetune")
    if ft:
        tasks = list(ft["data"])
        lines += ["", f"Held-out loss after {ft['steps']} steps (batch {ft['batch']}, {len(ft['seeds'])} seed(s)) "
                  f"for the adapter model and for the deployable merged low-bit model:", "",
                  "| method | base | " + " | ".join(f"{t} before → after → merged" for t in tasks) + " |",
                  "|---|---|" + "---|" * len(tasks)]
        for entry in ft["methods"].values():
            cells = []
            for t in tasks:
                r = finetune_quality.summary(entry["runs"][t])
                cells.append(f"{r['before']:.3f} → {r['after']:.3f} → {r['merged']:.3f}")
            lines.append(f"| {entry['label']} | {entry['base']} | " + " | ".join(cells) + " |")
        merges = [c for c in finetune_quality.findings(ft) if "does not survive" in c]
        lines += ["", "Merged: QA-LoRA / QA-HiRA folded into their INT4 minima; every other method dequantized, "
                  "added and re-quantized to its own format (how QLoRA is merged today).", "",
                  f"Smoke-test claim lines (short runs at one lr, not verdicts) are in [report.md]({out}/report.md); "
                  "the paper setting's verdicts (`bench/finetune_quality.py --paper`) supersede them.", *merges]
    speed = results.get("speed")
    if speed and speed.get("derived"):
        ratios = "; ".join(f"{d['comparison']}: step {d['step_ratio']:.2f}×, peak tensors {d['peak_ratio']:.2f}×"
                           for d in speed["derived"] if d.get("step_ratio") and d.get("peak_ratio"))
        lines += ["", f"Speed and memory ({speed['settings']['device']}): {ratios}."]
    if ft:
        lines += ["", f"![fine-tuning quality]({out}/finetune_quality.png)"]
    return "\n".join(lines)


def update_readme(summary: str, readme: Path) -> None:
    """Replace the generated results section (between the bench markers) of `readme` with `summary`."""
    from qbara.atomic import write_file_atomic

    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section to fill")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    new = f"{head}{README_START}\n{summary.strip()}\n{README_END}{tail}"
    write_file_atomic(readme, lambda tmp: Path(tmp).write_text(new))


def rewrite_report(args) -> None:
    """The report of an earlier run, from its results.json (e.g. after the report's layout changed)."""
    import json

    path = Path(args.from_json)
    try:
        saved = json.loads(path.read_text())
        command, seconds = saved["command"], saved["seconds"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--from-json {path}: not a results.json written by run_all ({exc!r}); pass the "
                         f"results.json of an earlier run's --out folder")
    meta = saved.get("meta") or {"date": datetime.date.today().isoformat(), "machine": machine()}
    args.quick = " --quick" in f" {command} "
    folder = path.parent
    for part, module, png in (("quality", lq_smollm2, "lq_quality.png"),
                              ("finetune", finetune_quality, "finetune_quality.png"),
                              ("speed", speed_memory, "speed_memory.png")):
        if part in saved:
            module.plot(saved[part], folder / png)
    write_report({k: v for k, v in saved.items() if k in PARTS}, args, command, seconds, meta, folder)


def main(argv=None) -> None:
    from qbara.atomic import write_json_atomic
    from qbara.models import load_model

    args = options(argv)
    if args.from_json:
        return rewrite_report(args)
    command = "python bench/run_all.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = part_arguments(args)
    model, tokenizer = load_model("smollm2-135m")
    results, seconds = {}, {}
    meta = {"date": datetime.date.today().isoformat(), "machine": machine()}
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
        write_json_atomic(out / "results.json", {"command": command, "seconds": seconds, "meta": meta, **results})
    write_report(results, args, command, seconds, meta, out)


def write_report(results: dict, args, command: str, seconds: dict, meta: dict, out: Path) -> None:
    """report.md in `out` (and the docs/benchmarks.md section with --readme)."""
    from qbara.atomic import write_file_atomic

    text = report(results, args, command, seconds, meta)
    write_file_atomic(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    print("\n" + text)
    if args.readme:
        rel = os.path.relpath(out.resolve(), SUMMARY_FILE.parent)
        update_readme(readme_summary(results, command, seconds, meta, rel), SUMMARY_FILE)
        print(f"{SUMMARY_FILE} results section updated from {out / 'report.md'}")


if __name__ == "__main__":
    main()
