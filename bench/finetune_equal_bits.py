"""LQ-LoRA (Fisher) vs QLoRA NF4 vs GPTQ-LoRA INT4 / INT3 after a short fine-tune, in the paper setting of
bench/finetune_paper.py (Hamlet chunks, rank 64, alpha 16, AdamW, warm-up, clipping; each method at its own lr
picked on validation seed --lr-seed, then the reported --seeds at that lr), next to their step-0 bits.

    OMP_NUM_THREADS=1 nice -n 5 python bench/finetune_equal_bits.py --out bench/results/gemma3-270m/equal_bits \\
        --reuse-qlora bench/results/gemma3-270m/paper/finetune_quality_paper.qlora.json
    python bench/finetune_equal_bits.py --out DIR --report       # join the parts: equal_bits.json / .md / .png
    # the exact (refine) Fisher table the LQ parts would read, resumable (hours), then the parts on it:
    nice -n 5 python bench/finetune_equal_bits.py --out DIR --dq-mode refine --table-only 2

Methods: `lq-fisher-B` is built as bench/step0_equal_bits.py builds its rows (the Fisher from Macbeth windows
after a BOS, the cached error table with dq_mode --dq-mode, named so a change of the library's default does not
move these rows, the ILP at budget B, the LQ decomposition with NF8 factors); its adapter starts at the factors, so
a seed draws only the data order. `gptq-FORMAT-gGROUP` is GPTQ-LoRA, `qbara.gptq_prepare`'s two steps with the
adapter drawn per seed: the GPTQ base (calibration: the bundled plays less Hamlet, each window after a BOS as for
step 0's GPTQ rows), then a LoRA at B = 0; `qlora` is finetune_quality's QLoRA (NF4 with double quant).
Step-0 total bits count LQ-LoRA's NF8 factors (the others start at the base); after training every method carries
a rank-64 adapter of the same size. Merged models are not evaluated (--no-merge).

Resumable per run: each method is a part (finetune_quality_paper.METHOD.json in --out) rewritten after every run
and resumed on a rerun (bench/finetune_paper.py --resume); --reuse-qlora starts the qlora part from a stored
paper-setting part of the same setting (its runs are the same runs; --verify-lr re-runs one to check). Verdicts:
per reported seed the held-out difference of the two methods (same seed: same data order); a verdict only when
the mean difference is beyond 2 SD of those paired differences, else "inconclusive".
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from step0_equal_bits import gptq_windows, measured_windows, total_bits

from qbara import AdapterConfig, LQConfig, prepare
from qbara.atomic import write_json_atomic
from qbara.commands.quantize import parse_format
from qbara.data import shakespeare_text
from qbara.lq.configs import candidate_configs, qlora_config
from qbara.lq.factors import FACTOR_CONFIG
from qbara.lq.fisher import fisher_information
from qbara.lq.tables import error_table
from qbara.models import load_model
from qbara.models.gptq import gptq_quantize_model
from qbara.targets import linear_layer_names

import finetune_paper as fp
import finetune_quality as fq

DEFAULT_METHODS = ("lq-fisher-3.0", "gptq-int4-g32", "lq-fisher-2.75", "gptq-int3-g64", "qlora")


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help="lq-fisher-BUDGET, gptq-FORMAT-gGROUP (e.g. gptq-int4-g32), qlora")
    ap.add_argument("--lrs", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3])
    ap.add_argument("--grow-to", type=float, metavar="LR",
                    help="double the lr while a method's best is its top one, up to LR (finetune_paper --grow-to)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr-seed", type=int, default=fp.LR_SEED)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dq-mode", default="shared", help="the LQ error table's dq_mode (as step0_equal_bits used)")
    ap.add_argument("--fisher-samples", type=int, default=32)
    ap.add_argument("--fisher-length", type=int, default=256)
    ap.add_argument("--reuse-qlora", type=Path, help="a stored paper-setting qlora part to start the qlora part from")
    ap.add_argument("--verify-lr", type=float, help="re-run the reused qlora part's lr-seed point at LR (determinism)")
    ap.add_argument("--report", action="store_true", help="only join the stored parts and write the report")
    ap.add_argument("--table-only", type=int, metavar="WORKERS",
                    help="only compute (or resume) the LQ parts' error table with --dq-mode on WORKERS threads, into "
                         "the cache the parts read: the exact one (refine) takes hours here, and resumes when rerun")
    ap.add_argument("--step0", type=Path, default=Path(__file__).parent / "results" / "gemma3-270m" / "step0" /
                    "step0.json", help="step0_equal_bits' result: the bits of an LQ part stopped before its end")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for m in args.methods:
        method_kind(m)
    return args


def method_kind(method: str) -> tuple[str, object]:
    """('lq', budget) | ('gptq', QuantConfig) | ('qlora', None); SystemExit naming the accepted forms otherwise."""
    try:
        if method == "qlora":
            return "qlora", None
        if method.startswith("lq-fisher-"):
            return "lq", float(method.removeprefix("lq-fisher-"))
        if method.startswith("gptq-"):
            fmt, group = method.removeprefix("gptq-").rsplit("-g", 1)
            return "gptq", parse_format(f"{fmt}:{int(group)}")
    except ValueError:
        pass
    raise SystemExit(f"unknown method {method!r}: use lq-fisher-BUDGET (e.g. lq-fisher-3.0), gptq-FORMAT-gGROUP "
                     "(e.g. gptq-int4-g32) or qlora")


def paper_args(args, method: str, resume: Path | None, verify: float | None = None) -> argparse.Namespace:
    """finetune_paper's options for one method's part (its setting keys are what --resume and --combine check)."""
    argv = ["--model", args.model, "--steps", str(args.steps), "--seeds", *map(str, args.seeds),
            "--lr-seed", str(args.lr_seed), "--rank", str(args.rank), "--threads", "1", "--no-merge",
            "--out", str(args.out), "--part", method, "--lrs", *map(str, args.lrs)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    if verify is not None:
        argv += ["--verify-lr", str(verify)]
    if args.grow_to is not None:
        argv += ["--grow-to", str(args.grow_to)]
    a = fp.options(argv)
    a.methods = [method]
    a.dq_mode, a.fisher_samples, a.fisher_length = args.dq_mode, args.fisher_samples, args.fisher_length
    return a


_FISHER: dict = {}
BITS: dict = {}  # method -> {"q", "total_step0", "prepare_s"}, filled when a method is prepared


def prepare_method(method: str, dense, tokenizer, args, seed: int = 0) -> fq.Prepared:
    """This bench's methods as finetune_paper runs them (seed: the lr seed; the reported seeds re-draw the
    adapter in fresh_model)."""
    start = time.perf_counter()
    kind, spec = method_kind(method)
    names = linear_layer_names(dense)
    if kind == "qlora":
        p = fq.prepare_method("qlora", dense, tokenizer, args, seed=seed)
        q = total_bits(dense, {n: qlora_config(4) for n in names}, 0)
    elif kind == "gptq":
        base = gptq_quantize_model(copy.deepcopy(dense), spec, gptq_windows(tokenizer),
                                   progress=False)
        adapter = AdapterConfig("lora", rank=args.rank, alpha=args.alpha, dropout=args.dropout)
        p = fq.Prepared(None, f"GPTQ-LoRA {spec.label} r{args.rank}", f"GPTQ {spec.label}", 0.0, adapter=adapter,
                        quantized=base)
        p.model = fq.fresh_model(p, seed)
        q = total_bits(dense, {n: spec for n in names}, 0)
    else:
        if "f" not in _FISHER:
            seqs = measured_windows(tokenizer, shakespeare_text("macbeth"), args.fisher_samples,
                                    args.fisher_length)
            _FISHER["f"] = fisher_information(dense, seqs, progress=False)
        fisher = _FISHER["f"]
        table = error_table(dense, candidate_configs(), rank=args.rank, fisher=fisher, workers=1,
                            dq_mode=args.dq_mode)
        print(f"error table ({args.dq_mode}): {'cache hit' if table.from_cache else 'computed'}: {table.path}",
              flush=True)
        configs = table.allocate(spec).configs
        lq = LQConfig(configs=configs, fisher=fisher, factor_format=FACTOR_CONFIG, workers=1,
                      patience=1)  # as the stored rows were built (LQConfig.patience defaulted to 1 then)
        model = prepare(copy.deepcopy(dense), lq, AdapterConfig(rank=args.rank, alpha=args.alpha))
        q = total_bits(dense, configs, args.rank)
        p = fq.Prepared(model, f"LQ-LoRA+Fisher r{args.rank} @{spec}", f"LQ {spec} (+factors {q[1]:.3f})", 0.0)
    p.seconds = time.perf_counter() - start
    BITS[method] = {"q": q[0], "total_step0": q[1], "prepare_s": p.seconds}
    print(f"{p.label}: {q[0]:.3f} bits ({q[1]:.3f} with factors), prepared in {p.seconds:.0f} s", flush=True)
    return p


# --------------------------------------------------------------------------------------------------
# Report


def held_by_seed(result: dict, method: str) -> dict[int, float]:
    return {r["seed"]: r["held"] for r in fp.final_runs(result, method)}


def paired(result: dict, a: str, b: str) -> dict | None:
    """a - b held-out loss, seed by seed over the seeds both have: mean, SD of the differences, verdict beyond
    2 SD ('lower' favours a), else inconclusive; None without a common seed."""
    ha, hb = held_by_seed(result, a), held_by_seed(result, b)
    seeds = sorted(set(ha) & set(hb))
    if not seeds:
        return None
    d = [ha[s] - hb[s] for s in seeds]
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else float("nan")
    if len(d) < 2:
        word = "inconclusive (one seed)"
    else:
        word = "lower" if mean + 2 * sd < 0 else "higher" if mean - 2 * sd > 0 else "inconclusive"
    return {"a": a, "b": b, "seeds": seeds, "mean_diff": mean, "sd": sd, "verdict": word}


def comparisons(result: dict) -> list[dict]:
    """Every LQ-LoRA method against every baseline, and the baselines against QLoRA."""
    methods = [m for m in result["methods"] if "best_lr" in result["methods"][m]]
    lq = [m for m in methods if m.startswith("lq-")]
    base = [m for m in methods if not m.startswith("lq-")]
    pairs = [(a, b) for a in lq for b in base] + [(a, "qlora") for a in base if a != "qlora" and "qlora" in base]
    return [p for p in (paired(result, a, b) for a, b in pairs) if p]


def markdown(result: dict) -> str:
    st, d, m = result["setting"], result["data"], result["methods"]
    lines = [f"# Fine-tune at equal bits ({st['model']})", "",
             f"Paper setting of bench/finetune_paper.py: {d['task']}, {d['train']} train / {d['val']} validation / "
             f"{d['held_out']} held-out chunks of {st['seq']} tokens{', each after a BOS' if d.get('bos') else ''}; "
             f"rank {st['rank']}, alpha {st['alpha']:g}, AdamW, {st['warmup']:.0%} warm-up, clip {st['clip']:g}, "
             f"batch {st['batch']} x {st['seq']}, {st['steps']} steps; each method's lr chosen on validation seed "
             f"{fp.lr_seed_of(st)} (not reported), then seeds {st['seeds']} at it. LQ-LoRA's error table: "
             f"dq_mode {result.get('dq_mode', 'shared')!r} (the cached table of the step-0 rows). Wall "
             f"{result.get('wall_s', 0) / 60:.0f} min of runs ({result.get('wall_note', '')}) on a 2-core machine "
             "shared with three other jobs (niced, one torch thread): times are load-dependent"
             + (" (per part, earlier sessions included: " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in
                                                                     result["part_wall_s"].items()) + ")"
                if result.get("part_wall_s") else "") + ".", "",
             f"Dense step-0 held-out loss {result['dense']['held']:.4f}.", "",
             "| method | bits/param of Q | step-0 total bits | trainable | lr grid (chosen bold) | step-0 held-out | "
             "after training (mean ± SD, n) | s/step | prepare s |", "|---|---|---|---|---|---|---|---|---|"]
    for method, e in m.items():
        bits = e.get("bits", {})
        grid = ", ".join(f"**{x:g}**" if fp.same_lr(x, e.get("best_lr", -1)) else f"{x:g}"
                         for x in fp.method_grid(result, method))
        s = fp.summary(result, method)
        after = (f"{s['held']:.4f} ± {s.get('held_sd', float('nan')):.4f} (n={s['n']})" if s["n"] else
                 "no reported seed yet")
        step_s = f"{s['step_s']:.2f}" if "step_s" in s else "–"
        lines.append(f"| {e['label']} | {bits.get('q', float('nan')):.3f} | {bits.get('total_step0', float('nan')):.3f}"
                     f" | {e['trainable']:,} | {grid} | {result['bases'][e['base']]['held']:.4f} | {after} | "
                     f"{step_s} | {bits.get('prepare_s', float('nan')):.0f} |")
    lines += ["", "Paired by seed (Δ = held-out loss of the first minus the second; a verdict only beyond 2 SD of the "
                  "per-seed differences, else inconclusive):", "",
              "| method | step-0 bits | vs | step-0 bits | Δ mean ± SD (seeds) | verdict: first's loss |",
              "|---|---|---|---|---|---|"]
    for c in comparisons(result):
        a, b = m[c["a"]], m[c["b"]]
        lines.append(f"| {a['label']} | {a.get('bits', {}).get('total_step0', float('nan')):.3f} | {b['label']} | "
                     f"{b.get('bits', {}).get('total_step0', float('nan')):.3f} | {c['mean_diff']:+.4f} ± "
                     f"{c['sd']:.4f} ({len(c['seeds'])}) | {c['verdict']} |")
    edge = [e["label"] for method, e in m.items() if "best_lr" in e and (g := fp.method_grid(result, method))
            and any(fp.same_lr(e["best_lr"], x) for x in (g[0], g[-1]))]
    if edge:
        lines += ["", f"Chosen lr at the edge of its grid (the best lr may lie outside): {', '.join(edge)}."]
    if result.get("determinism"):
        lines += ["", "Determinism (a reused stored run re-run): " + "; ".join(
            f"{c['method']} lr {c['lr']:g}: |Δ val| {c['val_diff']:.1e}" for c in result["determinism"]) + "."]
    if result.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Held-out loss by step-0 total bits: step 0 (open) and after training (filled, mean ± SD)."""
    from qbara.plotting import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7.5, 4.8))
    for method, e in result["methods"].items():
        bits = e.get("bits", {}).get("total_step0")
        s = fp.summary(result, method)
        if bits is None:
            continue
        line = ax.plot([bits], [result["bases"][e["base"]]["held"]], marker="o", mfc="none", ls="none")[0]
        if s["n"]:
            ax.errorbar([bits], [s["held"]], yerr=[s.get("held_sd", 0.0) if s["n"] > 1 else 0.0], marker="o",
                        color=line.get_color(), capsize=3, label=f"{e['label']} (lr {e['best_lr']:g})")
        ax.annotate("", xy=(bits, s["held"] if s["n"] else result["bases"][e["base"]]["held"]),
                    xytext=(bits, result["bases"][e["base"]]["held"]),
                    arrowprops={"arrowstyle": "->", "color": line.get_color(), "lw": 0.8})
    ax.axhline(result["dense"]["held"], color="black", ls="--", lw=1, label="dense, step 0")
    ax.set_xlabel("step-0 total bits / parameter (linears; LQ-LoRA with its NF8 factors)")
    ax.set_ylabel("held-out loss (open: step 0; filled: after training)")
    st = result["setting"]
    ax.set_title(f"{st['model']}: {st['steps']} steps, seeds {st['seeds']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def report(out: Path, dq_mode: str = "shared", rank: int = 64, step0: Path | None = None) -> dict:
    result = fp.combine(out, wall_note="the parts one after another on one niced single-thread worker, summed")
    for method, e in result["methods"].items():
        if "bits" not in e:  # a part stopped before its method's end
            e["bits"] = bits_of(method, rank, step0)
    parts = {p.name.removeprefix("finetune_quality_paper.").removesuffix(".json"): json.loads(p.read_text())
             for p in out.glob("finetune_quality_paper.*.json")}
    result["part_wall_s"] = {m: r.get("wall_s", 0.0) + r.get("earlier_wall_s", 0.0) for m, r in parts.items()}
    result["wall_s"] = sum(result["part_wall_s"].values())
    result["dq_mode"] = dq_mode
    notes = out / "NOTES.json"
    if notes.exists():
        result["notes"] = json.loads(notes.read_text())
    write_json_atomic(out / "equal_bits.json", result)
    (out / "equal_bits.md").write_text(markdown(result) + "\n\n![](equal_bits.png)\n")
    plot(result, out / "equal_bits.png")
    print(markdown(result))
    return result


def table_only(args) -> None:
    """--table-only: the error table prepare_method would compute (same Fisher windows, rank and mode), cached."""
    torch.set_num_threads(1)  # as fp.run computes the parts' Fisher: its digest is in the table's cache key
    dense, tokenizer = load_model(args.model)
    seqs = measured_windows(tokenizer, shakespeare_text("macbeth"), args.fisher_samples, args.fisher_length)
    fisher = fisher_information(dense, seqs, progress=False)
    start = time.perf_counter()
    table = error_table(dense, candidate_configs(), rank=args.rank, fisher=fisher, workers=args.table_only,
                        dq_mode=args.dq_mode)
    print(f"error table ({args.dq_mode}): {'cache hit' if table.from_cache else 'computed'} in "
          f"{time.perf_counter() - start:.0f} s: {table.path}", flush=True)


def main(argv=None) -> None:
    args = options(argv)
    if args.table_only:
        return table_only(args)
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        dense, tokenizer = load_model(args.model)
        for method in args.methods:
            part = args.out / f"finetune_quality_paper.{method}.json"
            verify = None
            if method == "qlora" and args.reuse_qlora and not part.exists():
                shutil.copyfile(args.reuse_qlora, part)
                verify = args.verify_lr
            a = paper_args(args, method, part if part.exists() else None, verify)
            result = fp.run(a, dense, tokenizer, prepare_method=prepare_method)
            if method in BITS:
                result["methods"][method]["bits"] = BITS[method]
            elif "bits" not in result["methods"].get(method, {}):
                result["methods"].setdefault(method, {})["bits"] = bits_of(method, args.rank, args.step0)
            write_json_atomic(part, result)
            if not any(m.startswith("lq-") for m in args.methods[args.methods.index(method) + 1:]):
                _FISHER.clear()  # 0.4 GB no later method needs
    report(args.out, args.dq_mode, args.rank, args.step0)


def bits_of(method: str, rank: int, step0: Path | None = None) -> dict:
    """Bits of a method whose part lacks them (complete before this process, or stopped before its end): one
    format on every linear gives its own bits; an LQ budget's come from step0_equal_bits' row of the same table,
    budget and rank (the same allocation), else nan."""
    kind, spec = method_kind(method)
    nan = float("nan")
    if kind != "lq":
        q = (qlora_config(4) if kind == "qlora" else spec).bits_per_param
        return {"q": q, "total_step0": q, "prepare_s": nan}
    rows = json.loads(step0.read_text())["rows"] if step0 is not None and step0.exists() else {}
    row = rows.get(f"LQ-LoRA+Fisher r{rank} @{spec}")
    return {"q": row["q_bits"], "total_step0": row["total_bits"], "prepare_s": nan, "from": "step0"} if row else \
        {"q": nan, "total_step0": nan, "prepare_s": nan}


if __name__ == "__main__":
    main()
