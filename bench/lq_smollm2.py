"""Quantization quality without training on SmolLM2-135M: QLoRA NF4 / NF3, LoftQ and LQ-LoRA (ILP allocation
at several budgets, with and without Fisher weighting) — total reconstruction error and Shakespeare perplexity
of the model at step 0 (Q + L1 L2), plus the wall time of the 210 x 432 error table and the allocations.

    python bench/lq_smollm2.py                          # table (cached) + allocation errors
    python bench/lq_smollm2.py --ppl --fisher --out DIR # + models, perplexity, Fisher rows, JSON + PNG
    python bench/lq_smollm2.py --recompute --workers 2  # time the table from scratch
    python bench/lq_smollm2.py --verify 12              # table vs full decompose() on sampled pairs

Errors are Σ_i ||W_i - Q_i - L1_i L2_i||_F² over the 210 linear weights, unweighted for every row (the
Fisher rows are allocated and decomposed with Fisher weights, then measured the same way); bits/param
counts Q only, as the LQ-LoRA paper's headline numbers; "+ NF8 factors" adds the rank-r factors stored
in NF8 (8.127 bits per value, qbara.lq.factors). Perplexity: Hamlet, GPTQ-style windows.
The Fisher information comes from Macbeth (not the evaluation play).
"""
from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch

from qbara import AdapterConfig, LQConfig, prepare, quantize_model
from qbara.adapters.attach import adapter_layers
from qbara.lq.configs import candidate_configs, qlora_config
from qbara.lq.decompose import decompose
from qbara.lq.factors import FACTOR_CONFIG
from qbara.lq.tables import DEFAULT_TABLE_ITERS, error_table
from qbara.models import load_model
from qbara.quant import quantize


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=DEFAULT_TABLE_ITERS, help="decomposition iterations in the table")
    ap.add_argument("--dq-mode", default="shared", choices=("shared", "refine", "loop"),
                    help="error table mode (default shared: the table the committed results were made with)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 2.75, 3.0, 3.25, 3.5, 4.0])
    ap.add_argument("--workers", type=int, default=None, help="matrices in parallel (threads)")
    ap.add_argument("--recompute", action="store_true", help="recompute the table even if cached (and re-cache it)")
    ap.add_argument("--verify", type=int, default=0, help="compare N sampled table entries with decompose()")
    ap.add_argument("--ppl", action="store_true", help="build every model and measure its perplexity")
    ap.add_argument("--fisher", action="store_true", help="add Fisher-weighted LQ-LoRA rows")
    ap.add_argument("--fisher-samples", type=int, default=32, help="calibration sequences (Macbeth)")
    ap.add_argument("--fisher-length", type=int, default=256)
    ap.add_argument("--max-iters", type=int, default=100, help="decompose() iterations (early stop) per matrix")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", help="folder for lq_quality.json and lq_quality.png")
    return ap.parse_args(argv)


def weight_error(dense_weights: dict, model) -> float:
    """Σ ||W - W_model||² over the matrices, W_model = dequant(Q) (+ s·B A when adapters are attached)."""
    layers = adapter_layers(model)
    total = 0.0
    for n, w in dense_weights.items():
        module = model.get_submodule(n)
        if n in layers:
            approx = module.base.dequantize() + module.delta_weight()
        else:
            approx = module.dequantize()
        total += float((w - approx).pow(2).sum())
    return total


def build(base, configs: dict, rank: int, method: str, fisher=None, max_iters: int = 100, workers=None):
    """A copy of `base` quantized as `method` says: plain (rank 0), or LoftQ / LQ on these per-layer configs (an
    allocation already made) through `prepare(model, LQConfig(...), AdapterConfig(...))`, adapters from the
    factors."""
    model = copy.deepcopy(base)
    if method == "plain":
        return quantize_model(model, configs)
    # LoftQ: its one alternation; LQ: patience 1 as the stored rows were built (LQConfig.patience defaulted to 1 then)
    iters = {"max_iters": max_iters, "patience": 1} if method == "lq" else {}
    lq = LQConfig(configs=configs, method=method, fisher=fisher, workers=workers, **iters)
    return prepare(model, lq, AdapterConfig(rank=rank, alpha=16.0), progress=True)


def run(args, model=None, tokenizer=None) -> dict:
    """Tables, allocations and (with --ppl) the models' errors and perplexities; returns the result dict."""
    from qbara.data import shakespeare_text
    from qbara.eval import perplexity

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(args.model)
    print(f"model load: {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    result = {"model": args.model, "rank": args.rank, "table_iters": args.iters, "rows": []}

    t0 = time.perf_counter()
    table = error_table(model, candidate_configs(), rank=args.rank, iters=args.iters, dq_mode=args.dq_mode,
                        recompute=args.recompute, workers=args.workers)
    t_table = time.perf_counter() - t0
    allocations = {}
    t0 = time.perf_counter()
    for budget in args.budgets:
        allocations[budget] = table.allocate(budget)
    t_alloc = time.perf_counter() - t0
    src = "cache hit" if table.from_cache else "computed"
    result["timing"] = {"table_s": t_table, "table_compute_s": table.seconds, "table_source": src,
                        "allocations_s": t_alloc, "budgets": len(args.budgets)}
    print(f"error table {len(table.names)} x {len(table.configs)}: {t_table:.1f} s wall ({src}, "
          f"{table.seconds:.1f} s of compute when built); {len(args.budgets)} allocations {t_alloc:.1f} s")
    low, high = table.budget_range()
    print(f"feasible budgets {low:.3f} .. {high:.3f} bits/param")

    weights = {n: model.get_submodule(n).weight.detach().clone() for n in table.names}
    plans = [("QLoRA NF4", "plain", {n: qlora_config(4) for n in weights}, None),
             ("QLoRA NF3", "plain", {n: qlora_config(3) for n in weights}, None),
             (f"LoftQ NF4 r{args.rank}", "loftq", {n: qlora_config(4) for n in weights}, None),
             (f"LoftQ NF3 r{args.rank}", "loftq", {n: qlora_config(3) for n in weights}, None)]
    plans += [(f"LQ-LoRA r{args.rank} @{b}", "lq", allocations[b].configs, None) for b in args.budgets]
    if args.fisher:
        from qbara.lq.fisher import calibration_sequences, fisher_information

        t0 = time.perf_counter()
        sequences = calibration_sequences(tokenizer, shakespeare_text("macbeth"), args.fisher_samples,
                                          args.fisher_length)
        fisher = fisher_information(model, sequences)
        t_fisher = time.perf_counter() - t0
        t0 = time.perf_counter()
        table_f = error_table(model, candidate_configs(), rank=args.rank, iters=args.iters, dq_mode=args.dq_mode,
                              fisher=fisher, workers=args.workers)
        result["timing"].update(fisher_s=t_fisher, fisher_table_s=time.perf_counter() - t0)
        print(f"Fisher ({args.fisher_samples} x {args.fisher_length} tokens of Macbeth): {t_fisher:.0f} s; "
              f"Fisher table {result['timing']['fisher_table_s']:.0f} s")
        plans += [(f"LQ-LoRA+Fisher r{args.rank} @{b}", "lq", table_f.allocate(b).configs, fisher)
                  for b in args.budgets]

    ids = None
    if args.ppl:
        ids = torch.tensor(tokenizer(shakespeare_text("hamlet"), add_special_tokens=False)["input_ids"])
        dense_ppl = perplexity(model, ids, window=args.window, max_tokens=args.ppl_tokens, progress=False)
        result["dense_ppl"] = dense_ppl.ppl
        result["ppl_tokens"], result["window"] = dense_ppl.tokens, dense_ppl.window
        print(f"dense fp32 perplexity {dense_ppl.ppl:.3f} (Hamlet, {dense_ppl.tokens} tokens, window {args.window})")
    for label, method, configs, fisher in plans:
        bits = sum(configs[n].bits_per_param * w.numel() for n, w in weights.items()) / sum(
            w.numel() for w in weights.values())
        row = {"method": label, "kind": method, "fisher": fisher is not None, "bits_per_param": bits}
        if method != "plain":  # + the rank-r factors stored in NF8 (qbara.lq.factors, 8.127 bits per value)
            factor_values = sum(args.rank * sum(w.shape) for w in weights.values())
            row["bits_with_nf8_factors"] = bits + FACTOR_CONFIG.bits_per_param * factor_values / sum(
                w.numel() for w in weights.values())
        if method == "plain":
            row["error"] = sum(float((w - quantize(w, configs[n], n).dequantize()).pow(2).sum())
                               for n, w in weights.items())
        if args.ppl:
            t0 = time.perf_counter()
            built = build(model, configs, args.rank, method, fisher, args.max_iters, args.workers)
            row["build_s"] = time.perf_counter() - t0
            row["error"] = weight_error(weights, built)
            row["ppl"] = perplexity(built, ids, window=args.window, max_tokens=args.ppl_tokens, progress=False).ppl
            del built
        elif method == "lq" and fisher is None:
            row["error"] = table.allocate(float(label.rsplit("@", 1)[1])).error
            row["note"] = "table estimate"
        if "error" in row:
            print(f"  {label:34s} {bits:6.3f} bits  error {row['error']:9.2f}"
                  + (f"  ppl {row['ppl']:8.3f}  ({row['build_s']:.0f} s)" if "ppl" in row else ""), flush=True)
        result["rows"].append(row)

    if args.verify:
        result["verify"] = verify(table, weights, args)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from qbara.atomic import write_json_atomic

        write_json_atomic(out / "lq_quality.json", result)
        if any("error" in r for r in result["rows"]):
            plot(result, out / "lq_quality.png")
    return result


def verify(table, weights, args) -> list[dict]:
    """Table entries against full decompositions on sampled (matrix, config) pairs."""
    rng = random.Random(0)
    rows = []
    print(f"\nverify: table vs decompose() on {args.verify} sampled (matrix, config) pairs")
    for _ in range(args.verify):
        i, j = rng.randrange(len(table.names)), rng.randrange(len(table.configs))
        w, cfg = weights[table.names[i]], table.configs[j]
        short = decompose(w, cfg, rank=args.rank, max_iters=args.iters).error
        full = decompose(w, cfg, rank=args.rank, max_iters=100).error
        t = float(table.costs[i, j]) ** 0.5
        rows.append({"matrix": table.names[i], "config": cfg.label, "table": t, "decompose": short, "full": full})
        print(f"  {table.names[i][6:]:38s} {cfg.label:26s} table {t:8.4f} decompose@{args.iters} {short:8.4f} "
              f"@100 {full:8.4f} ratio {t / short:.3f}")
    return rows


def plot(result: dict, path) -> Path:
    """Reconstruction error (and perplexity, when measured) against bits/param, one marker per method family."""
    from qbara.plotting import pyplot, save_figure

    rows = [r for r in result["rows"] if "error" in r]
    with_ppl = any("ppl" in r for r in rows)
    fig, axes = pyplot().subplots(1, 2 if with_ppl else 1, figsize=(11 if with_ppl else 6, 4.2), squeeze=False)
    families = {("plain", False): ("QLoRA (plain NF)", "s", "tab:gray"), ("loftq", False): ("LoftQ", "^", "tab:orange"),
                ("lq", False): ("LQ-LoRA", "o", "tab:blue"), ("lq", True): ("LQ-LoRA + Fisher", "D", "tab:green")}
    keys = [("error", "Σ ||W - Q - L1L2||²")] + ([("ppl", "perplexity (Hamlet)")] if with_ppl else [])
    for ax, (key, ylabel) in zip(axes[0], keys):
        for (kind, fisher), (label, marker, color) in families.items():
            pts = sorted((r["bits_per_param"], r[key]) for r in rows if r["kind"] == kind and r["fisher"] == fisher
                         and key in r)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=label, ls="-" if kind == "lq" else "none")
        if key == "ppl" and "dense_ppl" in result:
            ax.axhline(result["dense_ppl"], color="k", ls="--", lw=1, label="fp32")
        ax.set_xlabel("bits / parameter (quantized part)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['model']}: quantization quality at step 0 (rank {result['rank']})")
    fig.tight_layout()
    return save_figure(fig, path)


def markdown(result: dict) -> str:
    """The result as a Markdown table."""
    lines = ["| method | bits/param | + NF8 factors | Σ‖W − Q − L1L2‖² | perplexity |", "|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (-r["bits_per_param"], r["method"])):
        if "error" not in r:
            continue
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "–"
        with_factors = f"{r['bits_with_nf8_factors']:.3f}" if "bits_with_nf8_factors" in r else "–"
        lines.append(f"| {r['method']} | {r['bits_per_param']:.3f} | {with_factors} | {r['error']:.1f} | {ppl} |")
    if "dense_ppl" in result:
        lines.append(f"| fp32 (dense) | 32 | – | 0 | {result['dense_ppl']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    result = run(options(argv))
    print()
    print(markdown(result))
    t = result["timing"]
    print(f"\ntable + {t['budgets']} allocations: {t['table_s'] + t['allocations_s']:.1f} s wall ({t['table_source']})")


if __name__ == "__main__":
    main()
