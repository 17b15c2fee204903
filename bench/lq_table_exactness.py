"""How exact is the LQ-LoRA error table, and at what cost: the exact table (dq_mode="refine", the default) and the
warm-started one ("warm") against the fast approximation ("shared") on SmolLM2-135M's linears at rank 64.
"refine-p3" is "refine" before its runs stopped on a stall (`tables.REFINE_STALL = None`: patience 3 alone).

    nice -n 10 python bench/lq_table_exactness.py [--layer 15] [--matrices 7] [--check 2] [--out ...md]
    # Fisher-weighted (LQ-LoRA's main setting), its rows added to the same file:
    nice -n 10 python bench/lq_table_exactness.py --fisher 8 --matrices 2 --check 2 --append

Time: every mode's table of the first `--matrices` of one decoder layer's 7 matrices (all 7: every shape SmolLM2
has) with all 432 candidates, one thread, in the same run; with all 7, extrapolated to the 210 matrices (x 30).
Exactness: on `--check` of those matrices, the cost of
one config per (b, B0, b0) family (b1 = fp32, B1 = 16) against `converged_cost` (the config's own
decomposition run to convergence, LQ-LoRA's per-config procedure); ratio table / reference. With --fisher N
every table and reference is Fisher-weighted (the diagonal Fisher of N Macbeth windows of 256 tokens, as
bench/finetune_quality.py computes it) and the error is ||sqrt(F) * E||.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qbara.data import shakespeare_text
from qbara.lq import tables
from qbara.lq.configs import candidate_configs
from qbara.lq.fisher import calibration_sequences, fisher_information
from qbara.lq.tables import converged_cost, matrix_costs
from qbara.models import load_model

RANK = 64


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--matrices", type=int, default=7, help="matrices of the layer timed (7: the whole layer)")
    ap.add_argument("--modes", nargs="+", default=["shared", "warm", "refine"],
                    help="dq_modes, and refine-p3 (refine stopped by patience 3 alone)")
    ap.add_argument("--check", type=int, default=2, help="matrices of the layer checked against the reference")
    ap.add_argument("--fisher", type=int, default=0, metavar="N",
                    help="Fisher-weight tables and references (Fisher from N Macbeth windows of 256 tokens)")
    ap.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lq_table_exactness.md")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = options(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    layer = f"model.layers.{args.layer}."
    weights = {n.removesuffix(".weight"): p.detach().float() for n, p in model.named_parameters()
               if n.startswith(layer) and n.endswith("proj.weight")}
    weights = dict(list(weights.items())[: args.matrices])
    fisher = {name: None for name in weights}
    if args.fisher:
        seqs = calibration_sequences(tokenizer, shakespeare_text("macbeth"), args.fisher, 256)
        found = fisher_information(model, seqs, list(weights), progress=False)
        fisher = {name: found[name].float() for name in weights}
    weighting = f"Fisher-weighted ({args.fisher} Macbeth windows of 256 tokens)" if args.fisher else "unweighted"
    n_layers = model.config.num_hidden_layers
    configs = candidate_configs()
    title = "#" if not args.append else "##"
    lines = [f"{title} LQ error table: exactness and cost ({args.model}, rank {RANK}, one thread, {weighting})", ""]

    modes = args.modes
    seconds = {mode: 0.0 for mode in modes}
    costs: dict[str, dict[str, torch.Tensor]] = {mode: {} for mode in modes}
    for i, (name, W) in enumerate(weights.items()):
        for mode in seconds:
            stall = tables.REFINE_STALL
            tables.REFINE_STALL = None if mode == "refine-p3" else stall
            start = time.perf_counter()
            costs[mode][name] = matrix_costs(W, configs, rank=RANK, dq_mode=mode.removesuffix("-p3"), seed=i,
                                             fisher=fisher[name])
            seconds[mode] += time.perf_counter() - start
            tables.REFINE_STALL = stall
        print(f"{name} {tuple(W.shape)}: " + " ".join(f"{m} {s:.1f}s" for m, s in seconds.items()) + " (cumulative)",
              flush=True)
    whole = len(weights) == 7
    lines += [f"Time for {', '.join(n.removeprefix(layer) for n in weights)} of layer {args.layer}"
              + (f" (x {n_layers} layers = {7 * n_layers} matrices, extrapolated)" if whole else "")
              + f", {len(configs)} candidates each, all modes in the same run:", "",
              "| table | seconds | extrapolated, whole model | ratio to shared |", "|---|---|---|---|"]
    for mode, s in seconds.items():
        total = f"{s * n_layers / 60:.1f} min" if whole else "-"
        lines.append(f"| {mode} | {s:.1f} | {total} | {s / seconds[modes[0]]:.2f} |")
    if "refine" in seconds and "refine-p3" in seconds:
        lines += ["", f"refine / refine-p3 time: {seconds['refine'] / seconds['refine-p3']:.2f}"]
    lines += [""]

    if "refine" in costs and "refine-p3" in costs:  # all configs of all timed matrices, no reference needed
        q = torch.cat([costs["refine"][n] / costs["refine-p3"][n] for n in weights]).tolist()
        lines += [f"refine / refine-p3 cost, all {len(q)} entries: max {max(q):.4f}, "
                  f"median {statistics.median(q):.4f}, {sum(x > 1.01 for x in q)} above 1.01", ""]
    checked = [c for c in configs if (c.dq_dtype, c.dq_block_size) == ("fp32", 16)]
    header = None
    if args.check:
        ratios: dict[str, list[float]] = {mode: [] for mode in modes}
        rows = []
        for i, (name, W) in enumerate(list(weights.items())[: args.check]):
            for c in checked:
                j = configs.index(c)
                ref = converged_cost(W, c, RANK, fisher=fisher[name], seed=i)
                r = {mode: float(costs[mode][name][j]) / ref for mode in ratios}
                for mode in ratios:
                    ratios[mode].append(r[mode])
                cells = " | ".join(f"{r[m]:.3f}" for m in modes)
                rows.append(f"| {name.removeprefix(layer)} | {c.label} | {cells} |")
                print(rows[-1], flush=True)
        lines += [f"Cost / converged per-config decomposition on {args.check} matrices x {len(checked)} configs "
                  f"(one per (b, B0, b0) family):", "",
                  "| table | max | median | min | share > 1.03 |", "|---|---|---|---|---|"]
        for mode, rs in ratios.items():
            over = sum(r > 1.03 for r in rs) / len(rs)
            lines.append(f"| {mode} | {max(rs):.3f} | {statistics.median(rs):.3f} | {min(rs):.3f} | {over:.0%} |")
        header = "| matrix | config | " + " | ".join(modes) + " |"
        lines += ["", header, "|---|---|" + "---|" * len(modes), *rows, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if args.append and args.out.exists():
        text = args.out.read_text().rstrip("\n") + "\n\n" + text
    args.out.write_text(text)
    print("\n".join(lines[: lines.index(header)] if header else lines))


if __name__ == "__main__":
    main()
