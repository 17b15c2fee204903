"""Ablation (issue #31): why does `qbara gguf`'s Fisher mix at IQ4_NL's tensor bytes lose to llama.cpp's IQ4_NL made
with an importance matrix on Gemma 3 270M? Allocation (which format per linear) and rounding (which statistic
weighs each block's scale search) are varied one at a time, every variant scored in torch: the fp32 model holding
the variant's dequantized weights (token embedding Q8_0 as in every file of the benchmark), per-window NLL on the
held-out windows of bench/gguf_calibration.py (Twelfth Night, held-out GSM8K; BOS first, 16 x 512 tokens).

  V1  llama.cpp IQ4_NL's formats (IQ4_NL, its Q5_1 / Q5_K fallbacks), unweighted rounding   ~ stock IQ4_NL
  V2  IQ4_NL+imatrix's formats, rounding weighted by the importance matrix (mean x² per column)  ~ stock +imatrix
  V3  the same formats, rounding weighted by the per-weight Fisher diagonal
  V4  the Fisher mix's allocation, Fisher-weighted rounding            (the benchmark's qbara file)
  V5  the Fisher mix's allocation, imatrix-weighted rounding
  V6  the imatrix-cost allocation (costs="imatrix"), imatrix rounding
  V8  V2 but the 11 linears V4 put in Q2_K / Q3_K take V4's format (what the mix's cuts cost, fewer bytes)
  V9  V2 but the linears V4 holds exactly (its format reproduces the source GGUF's) take V4's format (what the
      mix's lossless layers gain, more bytes)
  V7  the Fisher mix's allocation with every format the source GGUF held exactly (zero-error entries) replaced
      by the cheapest format at or above IQ4_NL's bits (diagnostic; see the md)

Calibration: as the benchmark's files were built (32 x 256 tokens of The Tempest + Julius Caesar, seed 0) with
`--calibration-bos` off: windows WITHOUT the BOS at the offsets of qbara before the BOS change (the files in
/tmp/qbara-gguf-calibration were made so; their tensors are compared bit for bit with V1 / V2 / V4), or with it
on: the current library's windows (BOS first).
Paired per-window ΔNLL ± SE for every contrast; a verdict only beyond 2 SE. The cost models' own predictions
(Σ Fisher·ΔW², Σ imatrix·ΔW²) are reported per variant. Resumable: WORK/rows.json; md/json/png rewritten after
every variant.

    nice -n 5 python3 bench/gguf_mix_ablation.py [--variants V1 V2 V3 V4 V5 V6] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from gguf_calibration import (
    DRAW_PLAYS,
    bos_of,
    calibration_texts,
    gsm8k_calibration_file,
    gsm8k_split,
    held_out_windows,
)
from gguf_mix import paired_difference, window_nlls

DOMAINS = ("twelfth_night", "gsm8k")
VARIANTS = {
    "V1": ("IQ4_NL preset formats", "none"),
    "V2": ("IQ4_NL+imatrix preset formats", "imatrix"),
    "V3": ("IQ4_NL+imatrix preset formats", "fisher"),
    "V4": ("Fisher-cost allocation", "fisher"),
    "V5": ("Fisher-cost allocation", "imatrix"),
    "V6": ("imatrix-cost allocation", "imatrix"),
    "V7": ("Fisher allocation, exact-source formats lifted", "fisher"),
    "V8": ("IQ4_NL+imatrix formats, V4's Q2_K / Q3_K layers taken", "imatrix"),
    "V9": ("IQ4_NL+imatrix formats, V4's source-exact layers taken", "imatrix"),
}
CONTRASTS = [  # (A, B, what A - B measures)
    ("V2", "V1", "imatrix rounding vs none (preset formats)"),
    ("V3", "V2", "rounding: Fisher vs imatrix (preset formats)"),
    ("V4", "V3", "allocation: Fisher mix vs preset (Fisher rounding)"),
    ("V5", "V2", "allocation: Fisher mix vs preset (imatrix rounding)"),
    ("V4", "V5", "rounding: Fisher vs imatrix (Fisher allocation)"),
    ("V6", "V2", "allocation: imatrix mix vs preset (imatrix rounding)"),
    ("V4", "V2", "the benchmark's gap: Fisher mix vs IQ4_NL+imatrix"),
    ("V7", "V4", "lifting the exact-source formats of the Fisher mix"),
    ("V8", "V2", "the mix's 11 Q2_K / Q3_K layers alone (fewer bytes)"),
    ("V9", "V2", "the mix's source-exact layers alone (more bytes)"),
]
# The benchmark's files (read only): variant -> file whose linears it should equal code for code.
ANCHORS = {"V1": "stock-IQ4_NL.gguf", "V2": "stock-IQ4_NL-imatrix-shakespeare.gguf",
           "V4": "IQ4_NL-plain-shakespeare-fisher.gguf"}


def legacy_sequences(tokenizer, text: str, n: int, length: int, seed: int):
    """qbara's calibration windows before the BOS change (743e5aa): `n` windows of `length` text tokens at
    random offsets, no BOS (how the benchmark's Gemma 3 files were calibrated)."""
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def calibration(tokenizer, texts, samples, length, seed, bos: bool):
    """The benchmark's calibration sequences (mixed_calibration's sharing), with or without the BOS."""
    import torch

    from qbara.export.gguf.mix import mixed_calibration

    if bos:
        return mixed_calibration(tokenizer, texts, samples, length, seed)
    return torch.cat([legacy_sequences(tokenizer, t, samples // len(texts) + (i < samples % len(texts)), length,
                                       seed + i) for i, t in enumerate(texts)])


def gguf_name(module: str) -> str:
    from qbara.export.gguf.linears import LINEARS

    prefix, _, sub = module.partition(".layers.")
    index, _, rest = sub.partition(".")
    return next(f"blk.{index}.{g}.weight" for s, g in LINEARS if s == rest)


def _calibration_kind(setting: dict) -> str:
    if setting["calibration_bos"]:
        return "BOS first (current library)"
    return "no BOS, pre-743e5aa offsets (as the benchmark's files)"


def write_report(rows: dict, setting: dict, out: Path) -> None:
    have = [v for v in VARIANTS if v in rows]
    pairs = []
    for a, b, what in CONTRASTS:
        if a in rows and b in rows:
            for d in DOMAINS:
                pairs.append({"a": a, "b": b, "what": what, "domain": d,
                              **paired_difference(rows[a]["window_nlls"][d], rows[b]["window_nlls"][d])})
    verdict = {"qbara better": "A better", "stock better": "B better", "inconclusive": "inconclusive"}
    lines = [f"# Why the Fisher mix loses to IQ4_NL+imatrix ({setting['model']}): allocation x rounding ablation",
             "", f"Torch fp32 forward holding each variant's dequantized linears (token embedding Q8_0); held out: "
             f"{setting['windows']} windows x {setting['window']} tokens per domain, BOS first (as "
             f"bench/gguf_calibration.py). Calibration: {setting['samples']} x {setting['length']} tokens of The "
             f"Tempest + Julius Caesar, seed 0, {_calibration_kind(setting)}. "
             "Σ F·ΔW²: the Fisher cost model's prediction (what the Fisher ILP minimizes), Σ I·ΔW²: the imatrix "
             "cost model's. Paired ΔNLL = A − B ± SE over windows, verdict beyond 2 SE.", "",
             "| variant | allocation | rounding | tensor bytes (linears) | NLL Twelfth Night | NLL GSM8K | "
             "Σ F·ΔW² | Σ I·ΔW² | formats | anchor (llama.cpp file's linears equal) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if "dense" in rows:
        r = rows["dense"]
        lines.append("| dense (fp32, Q8_0 embedding) | - | - | - | " + " | ".join(
            f"{np.mean(r['window_nlls'][d]):.4f}" for d in DOMAINS) + " | 0 | 0 | - | - |")
    for v in have:
        r = rows[v]
        lines.append(f"| {v} | {VARIANTS[v][0]} | {VARIANTS[v][1]} | {r['linear_bytes']:,} | "
                     + " | ".join(f"{np.mean(r['window_nlls'][d]):.4f}" for d in DOMAINS)
                     + f" | {r['fisher_cost']:.4g} | {r['imatrix_cost']:.4g} | {r['counts']} | "
                       f"{r.get('anchor', '-')} |")
    lines += ["", "| contrast A − B | measures | Twelfth Night ΔNLL ± SE | GSM8K ΔNLL ± SE |", "|---|---|---|---|"]
    for a, b, what in CONTRASTS:
        cells = {p["domain"]: p for p in pairs if p["a"] == a and p["b"] == b}
        if cells:
            lines.append(f"| {a} − {b} | {what} | " + " | ".join(
                f"{cells[d]['mean_diff']:+.4f} ± {cells[d]['se']:.4f} {verdict[cells[d]['verdict']]}"
                for d in DOMAINS) + " |")
    if setting.get("llama"):
        lines += ["", "Sanity anchor: llama.cpp's NLL of the benchmark's files (bench/results/gemma3-270m/gguf/earlier,"
                  " same windows) against the torch NLL of the variant that reproduces them:", "",
                  "| variant | file | torch NLL TN / GSM8K | llama.cpp NLL TN / GSM8K |", "|---|---|---|---|"]
        for v, (key, nll) in setting["llama"].items():
            if v in rows:
                lines.append(f"| {v} | {key} | " + " / ".join(f"{np.mean(rows[v]['window_nlls'][d]):.4f}"
                                                          for d in DOMAINS)
                             + " | " + " / ".join(f"{nll[d]:.4f}" for d in DOMAINS) + " |")
    (out / "gguf_mix_ablation.md").write_text("\n".join(lines) + "\n")
    (out / "gguf_mix_ablation.json").write_text(json.dumps({"setting": setting, "rows": rows, "pairs": pairs},
                                                           indent=1))
    plot(pairs, out / "gguf_mix_ablation.png", setting["model"])


def plot(pairs, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pairs:
        return
    labels = list(dict.fromkeys(f"{p['a']} − {p['b']}: {p['what']}" for p in pairs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.5 + 0.45 * len(labels)), sharey=True)
    for ax, d in zip(axes, DOMAINS):
        for p in pairs:
            if p["domain"] == d:
                y = labels.index(f"{p['a']} − {p['b']}: {p['what']}")
                ax.errorbar(p["mean_diff"], y, xerr=2 * p["se"], fmt="o", capsize=3,
                            color="C3" if p["mean_diff"] - 2 * p["se"] > 0 else
                            "C2" if p["mean_diff"] + 2 * p["se"] < 0 else "C7")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"held out: {d}")
        ax.set_xlabel("ΔNLL A − B (± 2 SE; < 0: A better)")
    fig.suptitle(f"{model}: allocation x rounding ablation of the GGUF mix at IQ4_NL's bytes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calibration-bos", action="store_true",
                        help="calibrate with the current library's windows (BOS first) instead of the benchmark's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/qbara-uwhy")
    parser.add_argument("--files", default="/tmp/qbara-gguf-calibration/gemma3-270m",
                        help="the benchmark's files (read only): anchors and the Fisher mix's mix.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemma3-270m" / "gguf_ablation"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)

    tag = "bos" if args.calibration_bos else "nobos"
    work, out, files = Path(args.work) / tag, Path(args.out), Path(args.files)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    setting = {k: getattr(args, k) for k in ("model", "samples", "length", "window", "windows", "calibration_bos")}
    earlier = Path(__file__).parent / "results" / args.model / "gguf" / "earlier" / "gguf_calibration.json"
    if earlier.exists():
        llama_rows = json.loads(earlier.read_text())["rows"]
        keys = {"V1": "stock/IQ4_NL", "V2": "stock/IQ4_NL+imatrix/shakespeare",
                "V4": "IQ4_NL-plain/shakespeare/qbara-fisher"}
        setting["llama"] = {v: (k, {d: float(np.mean(llama_rows[k]["window_nlls"][d])) for d in DOMAINS})
                            for v, k in keys.items() if k in llama_rows}

    def put(key, row):
        rows[key] = row
        tmp = rows_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(rows_path)
        write_report(rows, setting, out)

    if args.report_only:
        write_report(rows, setting, out)
        return

    import torch

    torch.set_num_threads(args.threads)
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from qbara.export.gguf.mix import _ColumnWeights, gguf_file_budget
    from qbara.export.gguf.presets import preset_file
    from qbara.lq.configs import gguf_configs
    from qbara.lq.fisher import fisher_information, load_fisher, save_fisher
    from qbara.lq.imatrix import importance_matrix, load_importance, save_importance
    from qbara.lq.tables import error_table
    from qbara.models import load_model
    from qbara.quant.config import QuantConfig
    from qbara.quant.tensor import quantize
    from qbara.targets import linear_layer_names

    dense, tokenizer = load_model(args.model)
    dense.eval()
    names = linear_layer_names(dense, "all-linear", include_quantized=False)
    weights = {n: dense.get_submodule(n).weight.detach().clone() for n in names}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    bos = bos_of(tokenizer)
    _, held = gsm8k_split()
    windows = held_out_windows(tokenizer, held, args.window, args.windows, bos)
    embed = dense.get_input_embeddings().weight
    with torch.no_grad():  # every file of the benchmark holds the (tied) embedding as Q8_0
        embed.copy_(quantize(embed.detach(), QuantConfig("gguf:q8_0")).dequantize())

    def score() -> dict:
        return {d: window_nlls(dense, windows[d]) for d in DOMAINS}

    if "dense" not in rows:
        t = time.perf_counter()
        put("dense", {"window_nlls": score(), "seconds": time.perf_counter() - t})
        print("dense", {d: np.mean(v) for d, v in rows["dense"]["window_nlls"].items()}, flush=True)

    sequences = calibration(tokenizer, calibration_texts("shakespeare", gsm8k_calibration_file(
        work, gsm8k_split()[0], 1)), args.samples, args.length, 0, args.calibration_bos)
    assert DRAW_PLAYS[1] == ("tempest", "julius_caesar")
    imatrix_path, fisher_path = work / "imatrix.safetensors", work / "fisher.safetensors"
    if not imatrix_path.exists():
        save_importance(importance_matrix(dense, sequences, names), imatrix_path)
    imatrix = load_importance(imatrix_path)
    needs_fisher = any(VARIANTS[v][1] == "fisher" or v in ("V4", "V5", "V7") for v in args.variants)
    fisher = None
    if needs_fisher:
        if not fisher_path.exists():
            save_fisher(fisher_information(dense, sequences, names), fisher_path)
        fisher = load_fisher(fisher_path)

    def preset_formats(imatrix_preset: bool) -> dict:
        types = preset_file(dense, "IQ4_NL", imatrix=imatrix_preset).types
        return {n: QuantConfig(f"gguf:{types[gguf_name(n)]}") for n in names}

    def mix_formats(kind: str) -> dict:
        if kind == "fisher":  # the benchmark's file's allocation, as written in its report
            layers = json.loads((files / "IQ4_NL-plain-shakespeare-fisher.mix.json").read_text())["layers"]
            return {n: QuantConfig(f"gguf:{layers[n]['format']}") for n in names}
        preset = preset_file(dense, "IQ4_NL", imatrix=False)
        file = gguf_file_budget(dense, embedding=preset.types["token_embd.weight"],
                                output=preset.types.get("output.weight"), tokenizer=tokenizer)
        target = 8 * preset.tensor_bytes / file.total_params
        table = error_table(weights, gguf_configs(), rank=0, fisher=_ColumnWeights(imatrix, shapes),
                            importance=imatrix, seed=0)
        return dict(table.allocate(target, file).configs)

    def lifted(configs: dict) -> dict:
        """V7: where the Fisher mix took a format that holds the source exactly (the embedded model is a
        dequantized Q4_K_M GGUF), the cheapest format at or above IQ4_NL's bits that fits."""
        out_ = {}
        floor = QuantConfig("gguf:iq4_nl").bits_per_param
        cands = [c for c in gguf_configs() if c.bits_per_param >= floor]
        for n, c in configs.items():
            err = float((quantize(weights[n], c).dequantize() - weights[n]).square().sum())
            out_[n] = c if err > 0 else min((k for k in cands if k.fits(shapes[n])), key=lambda k: k.bits_per_param)
        return out_

    def exact(configs: dict) -> set:
        """The linears whose format holds the source exactly (the embedded model is a dequantized GGUF)."""
        return {n for n, c in configs.items()
                if float((quantize(weights[n], c).dequantize() - weights[n]).abs().max()) < 1e-6}

    def swapped(which: str) -> dict:
        base, mix = preset_formats(True), mix_formats("fisher")
        take = ({n for n, c in mix.items() if c.format in ("gguf:q2_k", "gguf:q3_k")} if which == "low"
                else exact(mix))
        return {n: mix[n] if n in take else base[n] for n in names}

    rounding_of = {"none": None, "imatrix": imatrix, "fisher": fisher}
    anchor_types = {}
    for v in args.variants:
        if v in rows:
            continue
        t = time.perf_counter()
        configs = {"V1": lambda: preset_formats(False), "V2": lambda: preset_formats(True),
                   "V3": lambda: preset_formats(True), "V4": lambda: mix_formats("fisher"),
                   "V5": lambda: mix_formats("fisher"), "V6": lambda: mix_formats("imatrix"),
                   "V7": lambda: lifted(mix_formats("fisher")), "V8": lambda: swapped("low"),
                   "V9": lambda: swapped("exact")}[v]()
        rounding = rounding_of[VARIANTS[v][1]]
        fcost = icost = 0.0
        nbytes = 0
        equal = compared = 0
        reader = GGUFReader(str(files / ANCHORS[v])) if v in ANCHORS and (files / ANCHORS[v]).exists() else None
        stored = {tt.name: tt for tt in reader.tensors} if reader is not None else {}
        counts: dict[str, int] = {}
        for n in names:
            c = configs[n]
            q = quantize(weights[n], c, name=n, importance=None if rounding is None else rounding[n])
            deq = q.dequantize().to(torch.float32)
            dw = (deq - weights[n]).double().square()
            if fisher is not None:
                fcost += float((dw * fisher[n].double()).sum())
            icost += float((dw * imatrix[n].double()[None, :]).sum())
            nbytes += math.prod(shapes[n]) * c.bits_per_param / 8
            fmt = c.format.removeprefix("gguf:")
            counts[fmt] = counts.get(fmt, 0) + 1
            tensor = stored.get(gguf_name(n))
            if tensor is not None:
                compared += 1
                theirs = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shapes[n])
                equal += bool(np.array_equal(theirs, deq.numpy()))
                anchor_types[n] = tensor.tensor_type.name
            with torch.no_grad():
                dense.get_submodule(n).weight.copy_(deq)
        built = time.perf_counter() - t
        nlls = score()
        with torch.no_grad():
            for n in names:
                dense.get_submodule(n).weight.copy_(weights[n])
        row = {"window_nlls": nlls, "fisher_cost": fcost if fisher is not None else float("nan"),
               "imatrix_cost": icost, "linear_bytes": round(nbytes), "counts": dict(sorted(counts.items(),
                                                                                        key=lambda kv: -kv[1])),
               "formats": {n: c.format for n, c in configs.items()}, "build_seconds": built,
               "score_seconds": time.perf_counter() - t - built}
        if reader is not None:
            row["anchor"] = f"{equal}/{compared} of {ANCHORS[v]}"
        put(v, row)
        print(v, {d: round(float(np.mean(x)), 4) for d, x in nlls.items()}, row.get("anchor"), row["counts"],
              f"{built:.0f}+{row['score_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
