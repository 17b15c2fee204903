"""LQ-LoRA (Fisher-weighted) against QLoRA NF4 and GPTQ INT4 / INT3 at step 0, by total bits per parameter
counting LQ-LoRA's rank-r factors (stored in NF8, 8.127 bits per value), on an embedded model (default Gemma 3
270M, whose linears ship mostly as Q5_0: re-quantizing them to 4 bits or below is a real test).

    OMP_NUM_THREADS=1 nice -n 5 python bench/step0_equal_bits.py --out bench/results/gemma3-270m/step0

Per model: Hamlet per-window NLL (windows of --window tokens from the first --windows x window tokens, each after
a BOS where the tokenizer adds one, as the model was trained), perplexity = exp(mean), and paired comparisons of
each LQ-LoRA budget against each baseline window by window: mean ΔNLL ± its standard error (SD / sqrt(windows)),
a verdict only beyond 2 SE, else "inconclusive". The total bits of the two sides are printed beside each pair:
LQ-LoRA's budget plus its factors lands between the baselines, so only the pairs with close totals compare equal
storage. Fisher: Macbeth windows (not the evaluation play); GPTQ calibration: the bundled plays less Hamlet.
Resumable: every finished model is saved to OUT/step0.json and skipped on a rerun; the error table is cached in
$QBARA_CACHE/lq.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from qbara import AdapterConfig, LQConfig, prepare, quantize_model
from qbara.atomic import write_json_atomic
from qbara.commands.quantize import parse_format
from qbara.data import shakespeare_text
from qbara.lq.configs import candidate_configs, qlora_config
from qbara.lq.factors import FACTOR_CONFIG
from qbara.lq.fisher import fisher_information
from qbara.lq.tables import error_table
from qbara.models import load_model
from qbara.models.gptq import _CALIBRATION_PLAYS, DEFAULT_LENGTH, DEFAULT_SAMPLES, gptq_quantize_model
from qbara.targets import linear_layer_names

from finetune_paper import bos_of


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.75, 3.0, 3.25, 3.5])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--gptq", default="int4:32,int3:64", help="comma-separated INT formats FORMAT:GROUP")
    ap.add_argument("--fisher-samples", type=int, default=32)
    ap.add_argument("--fisher-length", type=int, default=256)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dq-mode", default="shared", help="the error table's dq_mode (the rows so far: shared)")
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def measured_windows(tokenizer, text: str, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) windows as these rows were measured: `length` tokens at seeded random offsets of `text`, then
    the BOS put first and the last token dropped (`with_bos`). qbara's `calibration_sequences` has since put the
    BOS first itself and draws other offsets; sampling here keeps the stored rows (and their cached error tables,
    keyed by the Fisher) reproducible, with one BOS per window."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return with_bos(torch.stack([ids[s:s + length] for s in starts.tolist()]), bos_of(tokenizer))


def gptq_windows(tokenizer) -> torch.Tensor:
    """`gptq_calibration`'s default windows (its plays less Hamlet, its sample count and length), as measured."""
    plays = [p for p in _CALIBRATION_PLAYS if p != "hamlet"]
    return measured_windows(tokenizer, "\n\n".join(shakespeare_text(p) for p in plays), DEFAULT_SAMPLES,
                            DEFAULT_LENGTH)


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(n, L) windows -> (n, L) windows whose first token is the BOS (the last token dropped), or unchanged."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows[:, :-1]], dim=1)


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor) -> list[float]:
    """Mean NLL of every window's tokens after its first, one window at a time (a 262k vocabulary's logits)."""
    model.eval()
    out = []
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        out.append(float(torch.nn.functional.cross_entropy(logits, w[1:])))
    return out


def total_bits(model, configs: dict, rank: int) -> tuple[float, float]:
    """(bits/param of Q, bits/param of Q plus the NF8 factors) over the linears `configs` names."""
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in configs}
    numel = sum(a * b for a, b in shapes.values())
    q = sum(configs[n].bits_per_param * a * b for n, (a, b) in shapes.items()) / numel
    factors = FACTOR_CONFIG.bits_per_param * sum(rank * (a + b) for a, b in shapes.values()) / numel if rank else 0.0
    return q, q + factors


def paired(a: list[float], b: list[float]) -> dict:
    """a - b window by window: mean, standard error, ppl ratio, verdict beyond 2 SE (negative favours a)."""
    d = [x - y for x, y in zip(a, b)]
    mean, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    verdict = "lower" if mean + 2 * se < 0 else "higher" if mean - 2 * se > 0 else "inconclusive"
    return {"mean_diff": mean, "se": se, "ppl_ratio": math.exp(mean), "verdict": verdict}


def main(argv=None) -> None:
    args = options(argv)
    started = time.perf_counter()
    path = args.out / "step0.json"
    result = json.loads(path.read_text()) if path.exists() else {"model": args.model, "rank": args.rank, "rows": {}}
    rows = result["rows"]

    def save():
        result["wall_s"] = result.get("earlier_wall_s", 0.0) + time.perf_counter() - started
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)

    result["earlier_wall_s"] = result.get("wall_s", 0.0)
    model, tokenizer = load_model(args.model)
    bos = bos_of(tokenizer)
    ids = torch.tensor(tokenizer(shakespeare_text("hamlet"), add_special_tokens=False)["input_ids"])
    windows = with_bos(ids[: args.window * args.windows].view(args.windows, args.window), bos)
    result.update(window=args.window, windows=args.windows, bos=bos is not None)
    names = linear_layer_names(model)

    def measure(label, build, q_bits, bits, **extra):
        if label in rows:
            print(f"{label}: stored, skipped", flush=True)
            return
        t0 = time.perf_counter()
        built = build()
        nlls = window_nlls(built, windows)
        rows[label] = {"q_bits": q_bits, "total_bits": bits, "nlls": nlls, "ppl": math.exp(statistics.fmean(nlls)),
                       "seconds": time.perf_counter() - t0, **extra}
        print(f"{label}: {bits:.3f} bits, ppl {rows[label]['ppl']:.3f} ({rows[label]['seconds']:.0f} s)", flush=True)
        save()

    measure("dense", lambda: model, 32.0, 32.0)
    nf4 = {n: qlora_config(4) for n in names}
    q = total_bits(model, nf4, 0)[0]
    measure("QLoRA NF4", lambda: quantize_model(copy.deepcopy(model), nf4), q, q)
    calibration = None
    for spec in args.gptq.split(","):
        config = parse_format(spec.strip())
        if f"GPTQ {config.label}" in rows:
            continue
        calibration = calibration if calibration is not None else gptq_windows(tokenizer)
        q = total_bits(model, {n: config for n in names}, 0)[0]
        measure(f"GPTQ {config.label}", lambda: gptq_quantize_model(copy.deepcopy(model), config, calibration,
                                                                   progress=False), q, q)
    todo = [b for b in args.budgets if f"LQ-LoRA+Fisher r{args.rank} @{b}" not in rows]
    if todo:
        t0 = time.perf_counter()
        seqs = measured_windows(tokenizer, shakespeare_text("macbeth"), args.fisher_samples, args.fisher_length)
        fisher = fisher_information(model, seqs)
        t1 = time.perf_counter()
        # dq_mode named: the rows measured so far used the "shared" table, whatever the library's default becomes
        table = error_table(model, candidate_configs(), rank=args.rank, fisher=fisher, workers=args.workers,
                            dq_mode=args.dq_mode)
        result["timing"] = {"fisher_s": t1 - t0, "table_s": time.perf_counter() - t1, "dq_mode": args.dq_mode,
                            "table_source": "cache hit" if table.from_cache else "computed"}
        print(f"Fisher {t1 - t0:.0f} s, table {result['timing']['table_s']:.0f} s "
              f"({result['timing']['table_source']})", flush=True)
        save()
        for b in todo:
            configs = table.allocate(b).configs
            lq = LQConfig(configs=configs, fisher=fisher, factor_format=FACTOR_CONFIG, workers=args.workers,
                          patience=1)  # as the stored rows were built (LQConfig.patience defaulted to 1 then)
            measure(f"LQ-LoRA+Fisher r{args.rank} @{b}",
                    lambda: prepare(copy.deepcopy(model), lq, AdapterConfig(rank=args.rank, alpha=16.0)),
                    *total_bits(model, configs, args.rank), budget=b)
    report(result, args.out)


def report(result: dict, out: Path) -> None:
    """step0.md (rows, paired comparisons) and step0.png (ppl against total bits)."""
    from qbara.plotting import pyplot, save_figure

    rows = result["rows"]
    lines = [f"# Step 0 at equal total bits ({result['model']}, rank {result['rank']})", "",
             f"Hamlet, {result['windows']} windows of {result['window']} tokens"
             + (", each after a BOS" if result.get("bos") else "") + f"; wall {result.get('wall_s', 0) / 60:.0f} min "
             "(all sessions of this result, on a shared 2-core machine: load-dependent). Total bits count LQ-LoRA's "
             "rank-r factors in NF8 (8.127 bits each)."
             + (f" LQ error table: Fisher-weighted, dq_mode {t['dq_mode']!r} ({t['table_source']} in the last session)."
                if (t := result.get("timing", {})).get("dq_mode") else ""), "",
             "| model | bits/param of Q | total bits/param | Hamlet ppl | mean NLL |", "|---|---|---|---|---|"]
    for label, r in sorted(rows.items(), key=lambda kv: -kv[1]["total_bits"]):
        lines.append(f"| {label} | {r['q_bits']:.3f} | {r['total_bits']:.3f} | {r['ppl']:.3f} | "
                     f"{statistics.fmean(r['nlls']):.4f} |")
    lq = [k for k in rows if k.startswith("LQ-LoRA")]
    base = [k for k in rows if k.startswith(("QLoRA", "GPTQ"))]
    if lq and base:
        lines += ["", "Paired per window (ΔNLL = LQ-LoRA − baseline, ± standard error; a verdict only beyond 2 SE, "
                      "else inconclusive):", "",
                  "| LQ-LoRA | total bits | baseline | total bits | ΔNLL ± SE | ppl ratio | verdict: LQ-LoRA's NLL |",
                  "|---|---|---|---|---|---|---|"]
        for a in lq:
            for b in base:
                p = paired(rows[a]["nlls"], rows[b]["nlls"])
                lines.append(f"| {a} | {rows[a]['total_bits']:.3f} | {b} | {rows[b]['total_bits']:.3f} | "
                             f"{p['mean_diff']:+.4f} ± {p['se']:.4f} | {p['ppl_ratio']:.4f} | {p['verdict']} |")
    (out / "step0.md").write_text("\n".join(lines) + "\n\n![](step0.png)\n")
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for prefix, marker in (("LQ-LoRA", "o"), ("QLoRA", "s"), ("GPTQ", "^")):
        pts = sorted((r["total_bits"], r["ppl"]) for k, r in rows.items() if k.startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=prefix + (" (+ NF8 factors)" if prefix == "LQ-LoRA" else ""))
    if "dense" in rows:
        ax.axhline(rows["dense"]["ppl"], color="black", ls="--", lw=1, label="dense")
    ax.set_xlabel("total bits / parameter (linears)")
    ax.set_ylabel("Hamlet perplexity, step 0")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['model']}: step 0 by total bits")
    fig.tight_layout()
    save_figure(fig, out / "step0.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
