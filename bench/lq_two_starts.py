"""What the second decomposition start costs: `decompose` / the error table from both starts (the default,
starts=("svd", "quantize")) against the "svd" start alone, on one SmolLM2-135M decoder layer at rank 64.

    nice -n 10 python bench/lq_two_starts.py [--layer 15] [--out bench/results/lq_two_starts.md]

`decompose`: every matrix of the layer under a few formats (QLoRA's NF2/3/4/8 layout, INT4 G32, gguf:q4_1 and,
where 256 divides the row, gguf:q4_k), `max_iters` as LQConfig's default, each call's fastest of 2 per starts
setting (after one untimed warm-up call), one thread, both in the same run; the ratio is the two-start time over
the svd-only time (the second start also stops at its first non-improving iterate). Error: the two-start result's
error over the svd start's (<= 1).
Table: `matrix_costs` with dq_mode="shared" (the fast table, named: it was the default when the stored result was
measured; the default is now the exact "refine"), all 432 candidates, on the first --table-matrices matrices,
fastest of 2 each.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from qbara.lq.config import LQConfig
from qbara.lq.configs import candidate_configs, qlora_config
from qbara.lq.decompose import decompose
from qbara.lq.tables import matrix_costs
from qbara.models import load_model
from qbara.quant.config import QuantConfig

RANK = 64
SVD_ONLY = ("svd",)


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--table-matrices", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lq_two_starts.md")
    return ap.parse_args(argv)


def timed(fn, repeats: int = 2):
    """fn's result and its fastest time over `repeats` calls (the machine is shared: the minimum is the least
    disturbed)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main(argv=None) -> None:
    args = options(argv)
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    layer = f"model.layers.{args.layer}."
    weights = {n.removesuffix(".weight").removeprefix(layer): p.detach().float()
               for n, p in model.named_parameters() if n.startswith(layer) and n.endswith("proj.weight")}
    formats = {**{f"nf{b} (QLoRA layout)": qlora_config(b) for b in (2, 3, 4, 8)},
               "int4 G32": QuantConfig("int4", block_size=32), "gguf:q4_1": QuantConfig("gguf:q4_1"),
               "gguf:q4_k": QuantConfig("gguf:q4_k")}
    iters = LQConfig.__dataclass_fields__["max_iters"].default  # LQConfig's default
    first = next(iter(weights.values()))
    decompose(first, formats["nf4 (QLoRA layout)"], RANK, iters)  # warm-up, not timed
    rows, ratios = [], {}
    for name, W in weights.items():
        for label, config in formats.items():
            if not config.fits(tuple(W.shape)):
                continue
            one, t1 = timed(lambda: decompose(W, config, RANK, iters, starts=SVD_ONLY))
            two, t2 = timed(lambda: decompose(W, config, RANK, iters))
            ratios.setdefault(label, []).append(t2 / t1)
            err = two.error / one.error if one.error > 0 else float("nan")
            rows.append(f"| {name} | {label} | {t1:.2f} | {t2:.2f} | {t2 / t1:.2f} | {two.start} | {err:.4f} |")
            print(rows[-1], flush=True)
    table = {}
    configs = candidate_configs()
    for i, (name, W) in enumerate(list(weights.items())[: args.table_matrices]):
        for key, starts in (("svd", SVD_ONLY), ("both", None)):
            kw = {} if starts is None else {"starts": starts}
            _, t = timed(lambda: matrix_costs(W, configs, rank=RANK, seed=i, dq_mode="shared", **kw))
            table[key] = table.get(key, 0.0) + t
        print(f"table {name}: svd {table['svd']:.1f}s, both {table['both']:.1f}s (cumulative)", flush=True)
    all_ratios = [r for rs in ratios.values() for r in rs]
    lines = [f"# The second decomposition start: its cost ({args.model}, layer {args.layer}, rank {RANK}, one thread)",
             "", f"`python bench/lq_two_starts.py --layer {args.layer}` on the shared 2-core machine (niced, other "
             "jobs running: the ratios come from one run, the seconds are not quiet-machine times).", "",
             f"- `decompose` (max_iters {iters}), both starts over the svd start alone: median "
             f"{statistics.median(all_ratios):.2f}x, range {min(all_ratios):.2f}-{max(all_ratios):.2f}x over "
             f"{len(all_ratios)} (matrix, format) pairs.",
             f"- Error table (\"shared\", {len(configs)} candidates, {args.table_matrices} matrices): "
             f"{table['both']:.1f} s against {table['svd']:.1f} s, {table['both'] / table['svd']:.2f}x.", "",
             "| format | median | min | max |", "|---|---|---|---|"]
    lines += [f"| {label} | {statistics.median(rs):.2f} | {min(rs):.2f} | {max(rs):.2f} |"
              for label, rs in ratios.items()]
    lines += ["", "| matrix | format | svd start (s) | both (s) | ratio | winning start | error both / svd |",
              "|---|---|---|---|---|---|---|", *rows, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
