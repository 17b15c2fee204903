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
Stock rows (--stock PRESET ...): llama.cpp's presets made from the same F32 file without and with the importance
matrix of each calibration set; every qbara file is paired with each of them whose tensor bytes are at or below its
own (and with the matched file). A size `PRESET-plain` matches the preset's tensor bytes made without an importance
matrix (e.g. IQ4_NL-plain: every 3-4-bit preset of Gemma 3 270M, with or without imatrix, fits at or below it).
Calibration draws (--draw N): draw 1 is the set above with seed 0; draw N > 1 re-draws every random choice: other
plays (DRAW_PLAYS), the GSM8K calibration questions in another order, seed N - 1 for the sequences' offsets and the
tables; the held-out texts stay the same. Its rows are keyed CALIBRATION-dN.
Models whose tokenizer starts a text with BOS (Gemma 3) get BOS at the start of every held-out window (as llama.cpp's
perplexity tool does); the calibration sequences are qbara's (`mixed_calibration`: each after that BOS too, since
743e5aa), the same for both sides. Rows measured before that are kept under OUT/earlier/.
Resumable: every file is kept in --work, every scored row in WORK/rows.json and OUT/gguf_calibration.json (rerun to
continue, here or from the committed results); sizes run in the given order (the smallest first).
OUT/gguf_calibration.md and .png are rewritten after every row.

    nice -n 5 python3 bench/gguf_calibration.py [--sizes Q2_K Q4_0 Q3_K_M] [--windows 40] [--model smollm2-135m]
    nice -n 5 python3 bench/gguf_calibration.py --model gemma3-270m --sizes IQ4_NL-plain --calibrations shakespeare \
        --costs fisher --stock IQ4_NL IQ4_XS Q4_0 Q3_K_M Q2_K Q3_K_S --windows 16 [--draw 2]
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
DRAW_PLAYS = {1: ("tempest", "julius_caesar"), 2: ("macbeth", "othello"), 3: ("lear", "antony_and_cleopatra")}


def draw_label(calib: str, draw: int) -> str:
    """The rows' name of a calibration set in a draw: the set's name for draw 1, NAME-dN after."""
    return calib if draw == 1 else f"{calib}-d{draw}"


def base_calibration(label: str) -> str:
    return label.split("-d")[0]


def parse_size(token: str) -> tuple[str, bool]:
    """--sizes token -> (llama.cpp preset, made with an importance matrix): PRESET (with, as before) or
    PRESET-plain (without)."""
    return (token[:-len("-plain")], False) if token.endswith("-plain") else (token, True)


def gsm8k_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """GSM8K test questions split in two disjoint halves: (calibration, held out)."""
    from qbara.data import gsm8k_records, split_records

    calibration, held = split_records(gsm8k_records(), held_out=0.5, seed=seed)
    return [r["question"] for r in calibration], [r["question"] for r in held]


def gsm8k_calibration_file(work: Path, questions: list[str], draw: int) -> Path:
    """The calibration half as a JSONL of {"text": question}: in split order for draw 1, shuffled by the draw
    after (a re-drawn text; the held-out half is never touched)."""
    order = list(questions)
    if draw > 1:
        order = [order[i] for i in np.random.default_rng(draw - 1).permutation(len(order))]
    path = work / ("gsm8k_calibration.jsonl" if draw == 1 else f"gsm8k_calibration-d{draw}.jsonl")
    path.write_text("".join(json.dumps({"text": q}) + "\n" for q in order))
    return path


def calibration_texts(name: str, gsm8k_dataset: Path, draw: int = 1) -> list[str]:
    """The calibration texts of one set, one per domain, read as `qbara gguf --calibration` reads them."""
    from qbara.commands.gguf import calibration_text

    shakespeare = "\n\n".join(calibration_text(f"shakespeare:{play}") for play in DRAW_PLAYS[draw])
    gsm8k = calibration_text(f"dataset:{gsm8k_dataset}")
    return {"shakespeare": [shakespeare], "gsm8k": [gsm8k], "mixed": [shakespeare, gsm8k]}[name]


def bos_of(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts a text with it (Gemma 3), else None (SmolLM2)."""
    ids = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and ids and ids[0] == bos else None


def held_out_windows(tokenizer, held_questions: list[str], window: int, count: int,
                     bos: int | None = None) -> dict[str, list[list[int]]]:
    """Per domain, the first `count` windows of `window` tokens of its held-out text (BOS + window - 1 tokens
    each when `bos` is given)."""
    from qbara.data import shakespeare_text

    texts = {"twelfth_night": shakespeare_text("twelfth_night"), "gsm8k": "\n\n".join(held_questions)}
    step = window - (bos is not None)
    head = [] if bos is None else [bos]
    out = {}
    for domain, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = min(count, len(ids) // step)
        out[domain] = [head + ids[k * step:(k + 1) * step] for k in range(n)]
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


def references(rows: dict, key: str) -> list[str]:
    """The llama.cpp files a qbara row SIZE/LABEL/qbara-COSTS is paired with: the matched file of its size and
    calibration, and every stock file (plain, or with the importance matrix of the same calibration) whose tensor
    bytes are at or below its budget (the matched preset's tensor bytes; the file itself may be a few bytes
    under it)."""
    size, label, _ = key.split("/")
    mine = max(rows[key]["tensor_bytes"], rows[key].get("preset_tensor_bytes") or 0)
    out = [k for k in (f"{size}/{label}/llama.cpp",) if k in rows]
    stock = [k for k, r in rows.items() if r.get("kind") == "stock" and r["tensor_bytes"] <= mine
             and (not r.get("imatrix") or r.get("calibration") == label)]
    return out + sorted(stock, key=lambda k: (-rows[k]["tensor_bytes"], k))


def comparisons(rows: dict, domains=DOMAINS) -> list[dict]:
    """Paired per-window differences per (qbara file, reference, domain): each qbara file against each llama.cpp
    file at or below its size, and Fisher against imatrix costs at the same size and calibration."""
    out = []
    for key, row in rows.items():
        if row.get("kind") != "qbara":
            continue
        size, label, _ = key.split("/")
        pairs = [(ref, f"qbara {row['costs']} - {ref}") for ref in references(rows, key)]
        if row["costs"] == "fisher" and f"{size}/{label}/qbara-imatrix" in rows:
            pairs.append((f"{size}/{label}/qbara-imatrix", "qbara fisher - qbara imatrix"))
        for ref, label_pair in pairs:
            for domain in domains:
                p = paired_difference(row["window_nlls"][domain], rows[ref]["window_nlls"][domain])
                out.append({"size": size, "calibration": label, "a": key, "b": ref, "pair": label_pair,
                            "domain": domain, "in_domain": domain in IN_DOMAIN[base_calibration(label)],
                            "b_tensor_bytes": rows[ref]["tensor_bytes"], **p})
    return out


def best_references(rows: dict, pairs: list[dict]) -> list[dict]:
    """Per qbara file and domain, the pair with the llama.cpp file of lowest mean NLL on that domain among those
    it is paired with (the strongest file at or below its size)."""
    best = {}
    for p in pairs:
        if rows[p["b"]].get("kind") == "qbara":
            continue
        k = (p["a"], p["domain"])
        nll = float(np.mean(rows[p["b"]]["window_nlls"][p["domain"]]))
        if k not in best or nll < best[k][0]:
            best[k] = (nll, p)
    return [p for _, p in best.values()]


VERDICT = {"qbara better": "A better", "stock better": "B better", "inconclusive": "inconclusive"}


def _cell(p: dict) -> str:
    return f"{p['mean_diff']:+.4f} ± {p['se']:.4f} {VERDICT[p['verdict']]} ({'in' if p['in_domain'] else 'out'})"


def write_report(rows: dict, setting: dict, out: Path) -> None:
    domains = DOMAINS
    pairs = comparisons(rows, domains)
    best = best_references(rows, pairs)
    name = setting.get("name", "gguf_calibration")
    data = {"setting": setting, "rows": rows, "comparisons": pairs, "best": best}
    bos = " Every window starts with BOS (counted in its tokens)." if setting.get("bos") is not None else ""
    lines = [f"# Robust calibration of `qbara gguf` ({setting['model']}): held-out ΔNLL per domain, scored by "
             f"llama.cpp", "",
             f"Calibration: {setting['samples']} x {setting['length']} tokens per set (draw 1: The Tempest + Julius "
             f"Caesar, seed 0; draw N: CALIBRATION-dN, see the script); held out: Twelfth Night and held-out GSM8K "
             f"questions, up to {setting['windows']} windows of {setting['window']} tokens each.{bos} "
             "A − B: mean per-window NLL difference ± SE (negative: A better); verdict only beyond 2 SE. "
             "\"in\": the held-out domain is in the calibration set (other text of the same domain).", ""]
    if best:
        lines += ["Each qbara file against the best llama.cpp file at or below its budget (tensor bytes), per held-out "
                  "domain (best: lowest perplexity on that domain):", "",
                  "| qbara file (A) | held-out domain | best llama.cpp file (B) | ΔNLL ± SE, verdict (in/out) |",
                  "|---|---|---|---|"]
        for p in sorted(best, key=lambda p: (p["a"], p["domain"])):
            lines.append(f"| {p['a']} | {p['domain']} | {p['b']} | {_cell(p)} |")
        lines.append("")
    lines += ["Every pair:", "", "| A | B (tensor bytes) | Twelfth Night ΔNLL ± SE | GSM8K ΔNLL ± SE |",
              "|---|---|---|---|"]
    by_pair = {}
    for p in pairs:
        by_pair.setdefault((p["a"], p["b"]), {})[p["domain"]] = p
    for (a, b), cells in by_pair.items():
        lines.append(f"| {a} | {b} ({rows[b]['tensor_bytes']:,}) | "
                     + " | ".join(_cell(cells[d]) if d in cells else "-" for d in domains) + " |")
    lines += ["", "| file | tensor bytes | predicted by qbara's preset table | bits/param | ppl Twelfth Night | "
              "ppl GSM8K | build s | score s | types |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(rows.items(), key=lambda kv: (kv[1]["tensor_bytes"], kv[0])):
        ppl = {d: math.exp(float(np.mean(r["window_nlls"][d]))) for d in domains}
        predicted = r.get("preset_tensor_bytes")
        differs = predicted is not None and predicted != r["tensor_bytes"]
        check = "-" if predicted is None else f"{predicted:,}" + (" (differs)" if differs else "")
        if r.get("kind") == "qbara":  # for a qbara file: the budget it was allocated under
            check = "-" if predicted is None else f"budget {predicted:,}"
        build = r.get("build_seconds", r.get("seconds"))
        lines.append(f"| {key} | {r['tensor_bytes']:,} | {check} | {r['bits']:.4f} | {ppl['twelfth_night']:.3f} | "
                     f"{ppl['gsm8k']:.3f} | {_num(build)} | {_num(r.get('score_seconds'))} | {r['types']} |")
    if setting.get("missing"):
        lines += ["", f"Not measured yet ({len(setting['missing'])} files; rerun the script to continue): "
                      f"{', '.join(setting['missing'])}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot(rows, pairs, out / f"{name}.png", setting["model"])


def _num(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def plot(rows: dict, pairs: list[dict], path: Path, model: str) -> None:
    """One panel per held-out domain: for each qbara file (a colour), ΔNLL against each llama.cpp file it is
    paired with (one row each, by tensor bytes), 2-SE bars; Fisher against imatrix costs as a row too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pairs:
        return
    refs = sorted({p["b"] for p in pairs}, key=lambda k: (rows[k]["tensor_bytes"], k))
    mine = sorted({p["a"] for p in pairs})
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(13, max(3.0, 1.2 + 0.42 * len(refs) * max(1, len(mine) ** 0.5))),
                             squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, domain in zip(axes[0], DOMAINS):
        for j, a in enumerate(mine):
            pts = [p for p in pairs if p["a"] == a and p["domain"] == domain]
            offset = (j - (len(mine) - 1) / 2) * 0.8 / max(1, len(mine))
            for p in pts:
                ax.errorbar(p["mean_diff"], refs.index(p["b"]) + offset, xerr=2 * p["se"], fmt="o", ms=4,
                            color=colors[j % len(colors)], capsize=2, label=a if p is pts[0] else None)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(refs)), refs, fontsize=7)
        ax.set_title(f"held out: {domain}")
        ax.set_xlabel("ΔNLL, qbara − llama.cpp file (± 2 SE; < 0: qbara better)")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{model}: qbara gguf mixes vs llama.cpp's files at or below their tensor bytes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def missing_files(rows: dict, args) -> list[str]:
    labels = [draw_label(c, args.draw) for c in args.calibrations]
    keys = [f"stock/{p}" for p in args.stock]
    keys += [f"stock/{p}+imatrix/{label}" for p in args.stock for label in labels]
    for size in args.sizes:
        _, imatrix = parse_size(size)
        for label in labels:
            keys += [f"{size}/{label}/llama.cpp"] if imatrix else []
            keys += [f"{size}/{label}/qbara-{c}" for c in args.costs]
    return [k for k in keys if k not in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", nargs="+", default=["Q2_K", "Q4_0", "Q3_K_M"],
                        help="llama.cpp presets whose tensor bytes are the budgets, in run order: PRESET (made with "
                             "the imatrix) or PRESET-plain (without)")
    parser.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=CALIBRATIONS)
    parser.add_argument("--costs", nargs="+", default=list(COSTS), choices=COSTS)
    parser.add_argument("--stock", nargs="*", default=[],
                        help="llama.cpp presets scored without and with each calibration's imatrix (after the sizes)")
    parser.add_argument("--draw", type=int, default=1, choices=sorted(DRAW_PLAYS),
                        help="calibration draw: 1 = The Tempest + Julius Caesar, seed 0; N re-draws everything")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences per set")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="held-out windows per domain (at most)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--work", default="/tmp/qbara-gguf-calibration")
    parser.add_argument("--out", default=None, help="default: bench/results/gguf_calibration for SmolLM2, "
                        "bench/results/MODEL/gguf otherwise")
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--extra-bufts", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite md/png from the json")
    args = parser.parse_args(argv)

    results = Path(__file__).parent / "results"
    default_out = results / "gguf_calibration" if args.model == "smollm2-135m" else results / args.model / "gguf"
    work, out = Path(args.work) / args.model, Path(args.out or default_out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(work / "rows.json", out / "gguf_calibration.json")
    previous = json.loads((out / "gguf_calibration.json").read_text())["setting"] \
        if (out / "gguf_calibration.json").exists() else {}
    setting = {k: v for k, v in vars(args).items() if k not in ("report_only", "llama_python", "extra_bufts", "out")}
    if args.report_only:
        write_report(rows.data, {**setting, **previous}, out)
        return
    for k in ("window", "windows", "samples", "length"):  # the paired rows need the same windows and calibration
        if k in previous and previous[k] != setting[k] and rows.data:
            raise SystemExit(f"{out} was measured with --{k} {previous[k]}; use it, or another --out / --work")
    setting["runs"] = previous.get("runs", []) + [{k: setting[k] for k in ("sizes", "calibrations", "costs", "stock",
                                                                           "draw")}]

    import torch

    torch.set_num_threads(args.threads)
    from qbara.export import export_gguf
    from qbara.export.gguf.mix import mixed_calibration, write_mixed_gguf
    from qbara.export.gguf.presets import preset_file
    from qbara.lq.imatrix import importance_matrix
    from qbara.models import load_model

    calib_questions, held_questions = gsm8k_split()
    gsm8k_dataset = gsm8k_calibration_file(work, calib_questions, args.draw)
    seed = args.draw - 1
    labels = {c: draw_label(c, args.draw) for c in args.calibrations}
    dense, tokenizer = load_model(args.model)
    dense.eval()
    setting["bos"] = bos_of(tokenizer)
    setting["missing"] = missing_files(rows.data, args)
    windows = held_out_windows(tokenizer, held_questions, args.window, args.windows, setting["bos"])
    print({d: len(w) for d, w in windows.items()}, "held-out windows", flush=True)
    predicted = {(p, imx): preset_file(dense, p, imatrix=imx).tensor_bytes
                 for p in {*args.stock, *(parse_size(s)[0] for s in args.sizes)} for imx in (False, True)}
    src = work / "f32.gguf"
    if not src.exists():
        export_gguf(dense, tokenizer, src, embedding_type="f32", dense_type="f32", overwrite=True)

    def imatrix_of(label: str) -> Path:
        """llama.cpp's importance matrix of one calibration set, computed when a file first needs it."""
        imatrix = work / f"imatrix-{label}.npz"
        if not imatrix.exists():
            calib = base_calibration(label)
            sequences = mixed_calibration(tokenizer, calibration_texts(calib, gsm8k_dataset, args.draw),
                                          args.samples, args.length, seed)
            np.savez(imatrix, **gguf_imatrix(importance_matrix(dense, sequences, progress=True)))
        return imatrix

    def score(key: str, path: Path, build: float, extra: dict) -> None:
        flat = [w for d in DOMAINS for w in windows[d]]
        t = time.perf_counter()
        result = run_llama({"quantize": [], "windows": flat, "perplexity": [{"model": str(path)}]}, args, work)
        nlls, k = {}, 0
        for d in DOMAINS:
            nlls[d], k = result["perplexity"][0]["window_nlls"][k:k + len(windows[d])], k + len(windows[d])
        stats = tensor_stats(path)
        rows.put(key, {"path": str(path), "file_bytes": path.stat().st_size,
                       "tensor_bytes": round(stats["bits"] * stats["params"] / 8), **stats, "build_seconds": build,
                       "score_seconds": time.perf_counter() - t, "window_nlls": nlls, **extra})
        print(f"{key}: " + ", ".join(f"{d} ppl {math.exp(float(np.mean(v))):.3f}" for d, v in nlls.items()),
              flush=True)
        setting["missing"] = missing_files(rows.data, args)
        write_report(rows.data, setting, out)

    def llama_file(key: str, preset: str, label: str | None, dst: Path, extra: dict) -> None:
        if key in rows.data:
            return
        t = time.perf_counter()
        if not dst.exists():
            imatrix = None if label is None else str(imatrix_of(label))
            run_llama({"quantize": [{"src": str(src), "dst": str(dst), "ftype": preset, "imatrix": imatrix}],
                       "windows": [], "perplexity": []}, args, work)
        score(key, dst, time.perf_counter() - t, {"kind": "llama.cpp", "preset": preset, "imatrix": label is not None,
                                                  "preset_tensor_bytes": predicted[preset, label is not None],
                                                  **extra})

    for size in args.sizes:
        preset, match_imatrix = parse_size(size)
        for calib, label in labels.items():
            texts = calibration_texts(calib, gsm8k_dataset, args.draw)
            if match_imatrix:
                llama_file(f"{size}/{label}/llama.cpp", preset, label, work / f"{size}-imatrix-{label}.gguf",
                           {"calibration": label})
            for costs in args.costs:
                key = f"{size}/{label}/qbara-{costs}"
                if key in rows.data:
                    continue
                dst = work / f"{size}-{label}-{costs}.gguf"
                extra = {"kind": "qbara", "costs": costs, "calibration": label, "draw": args.draw}
                if not dst.exists() or not dst.with_suffix(".mix.json").exists():
                    report = write_mixed_gguf(args.model, dst, match=preset, match_imatrix=match_imatrix,
                                              calibration=texts, costs=costs, samples=args.samples,
                                              length=args.length, seed=seed, overwrite=True)
                    print(report.summary(), flush=True)
                mix = json.loads(dst.with_suffix(".mix.json").read_text())
                extra |= {"counts": mix["counts"], "preset_tensor_bytes": (mix["preset"] or {}).get("tensor_bytes")}
                score(key, dst, mix.get("seconds"), extra)
    for preset in args.stock:  # then the stock files, plain, then with each calibration's imatrix
        llama_file(f"stock/{preset}", preset, None, work / f"stock-{preset}.gguf", {"kind": "stock"})
        for label in labels.values():
            llama_file(f"stock/{preset}+imatrix/{label}", preset, label, work / f"stock-{preset}-imatrix-{label}.gguf",
                       {"kind": "stock", "calibration": label})
    write_report(rows.data, setting, out)


if __name__ == "__main__":
    main()
