"""When should an LQ-LoRA decomposition stop: at the first iterate that does not improve (patience 1, the loop before
LQConfig.patience) or after 3 in a row, or on a stall (the exact error table's rule, now the default)? SmolLM2
layer-15 matrices at rank 64, one config per (b, B0, b0) family (b1 = fp32, B1 = 16), plain and Fisher-weighted
(8 Macbeth windows of 256 tokens), one thread. Prints and writes per matrix: the squared error of patience 1 over
patience 3 (above 1: the longer run found a lower error), the error table's entry over each (what the ILP was
told against what the build delivers) and the time ratio.

    nice -n 5 python bench/lq_patience.py [--matrices 2] [--out bench/results/lq_patience.md]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path

import torch

from qbara.data import shakespeare_text
from qbara.lq.configs import candidate_configs
from qbara.lq.fisher import calibration_sequences, fisher_information
from qbara.lq.tables import matrix_costs
from qbara.models import load_model

decompose_module = importlib.import_module("qbara.lq.decompose")  # the package exports the function
RANK = 64


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--matrices", type=int, default=2, help="the layer's first N projection matrices")
    ap.add_argument("--fisher", type=int, default=8, help="Macbeth windows of 256 tokens for the Fisher rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lq_patience.md")
    return ap.parse_args(argv)


def decomposed(W, config, fisher, patience, seed):
    """(squared error, seconds, iterations) of `decompose` with this patience."""
    start = time.perf_counter()
    d = decompose_module.decompose(W, config, RANK, 100, fisher, seed=seed, patience=patience)
    return d.error ** 2, time.perf_counter() - start, sum(len(h) for h in d.start_errors.values())


def main(argv=None) -> None:
    args = options(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    names = [n for n, _ in model.named_modules() if n.startswith(f"model.layers.{args.layer}.")
             and n.endswith("proj")][: args.matrices]
    seqs = calibration_sequences(tokenizer, shakespeare_text("macbeth"), args.fisher, 256)
    fishers = fisher_information(model, seqs, names, progress=False)
    configs = [c for c in candidate_configs() if (c.dq_dtype, c.dq_block_size) == ("fp32", 16)]
    lines = [f"# LQ decomposition: patience 1 against 3 (+ stall) ({args.model} layer {args.layer}, rank {RANK}, "
             f"{len(configs)} configs: one per (b, B0, b0) family, one thread)", "",
             "`python bench/lq_patience.py`. Squared (Fisher-weighted) errors; p1/p3 above 1: patience 3 found a "
             "lower error. table/pN: the exact error table's entry (what the ILP was told) over the build's error.",
             "", "| matrix | weighting | p1/p3 max | p1/p3 median | p1/p3 min | worst config | table/p1 min | "
             "table/p3 min, median, max | time p3/p1 | iterations p1 → p3 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        W = model.get_submodule(name).weight.detach().float()
        for weighting in ("plain", "fisher"):
            F = fishers[name].float() if weighting == "fisher" else None
            table = matrix_costs(W, configs, rank=RANK, fisher=F, seed=i)
            rows = [(decomposed(W, c, F, 1, i), decomposed(W, c, F, 3, i)) for c in configs]
            ratio = [p1[0] / p3[0] for p1, p3 in rows]
            t1 = [float(table[j]) / rows[j][0][0] for j in range(len(configs))]
            t3 = [float(table[j]) / rows[j][1][0] for j in range(len(configs))]
            worst = max(range(len(configs)), key=lambda j: ratio[j])
            seconds = [sum(r[k][1] for r in rows) for k in (0, 1)]
            its = [sum(r[k][2] for r in rows) for k in (0, 1)]
            lines.append(f"| {name.removeprefix(f'model.layers.{args.layer}.')} | {weighting} | {max(ratio):.3f} | "
                         f"{statistics.median(ratio):.3f} | {min(ratio):.3f} | {configs[worst].label} | "
                         f"{min(t1):.3f} | "
                         f"{min(t3):.3f}, {statistics.median(t3):.3f}, {max(t3):.3f} | {seconds[1] / seconds[0]:.2f} | "
                         f"{its[0]} → {its[1]} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
